"""`gharial emulate ...`: the accelerator emulator's timing model, without running a server."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gharial.accelerator.capacity import LATENCY_TARGET_MS, CapacityStudy, StudyPoint, study
from gharial.accelerator.layout import lower
from gharial.accelerator.profile import DEFAULT_PROFILE, load_profile, named_profiles
from gharial.accelerator.timing import TimingModel
from gharial.asr.config import load_model_config, named_configs

app = typer.Typer(
    help="Emulate the accelerator card: capacity studies with its timing model.", no_args_is_help=True
)


@app.command()
def capacity(
    model: Annotated[
        str,
        typer.Option(
            help=f"model architecture: a named config ({', '.join(named_configs())}) or a model YAML"
        ),
    ] = "base",
    cards: Annotated[
        int, typer.Option(min=1, help="accelerator cards; streams are spread evenly (least loaded first)")
    ] = 1,
    beam: Annotated[
        int,
        typer.Option(
            min=1,
            help="beam width: the card evaluates the joint and prediction network for this many "
            "hypotheses per stream per round; 1 decodes greedily",
        ),
    ] = 1,
    profile: Annotated[
        str,
        typer.Option(help=f"card profile: a named profile ({', '.join(named_profiles())}) or a profile YAML"),
    ] = DEFAULT_PROFILE,
    seconds: Annotated[
        float, typer.Option(min=0.06, help="seconds of audio simulated per stream count (60 ms frames)")
    ] = 10.0,
    seed: Annotated[int, typer.Option(help="seed for the streams' phases, jitter and token emissions")] = 0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print one JSON object instead of the table: model, cards, max_rts, p99_ms_at_max, "
            "p99_ms_at_32 and sweep (one object per stream count)",
        ),
    ] = False,
) -> None:
    """Find the most real-time streams the cards serve at p99 frame latency <= 25 ms (timing only).

    Prints the sweep of stream counts simulated (latency, batch size, utilisation) and that maximum.
    """
    try:
        cfg = load_model_config(model)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err), param_hint="--model") from err
    try:
        card = load_profile(profile)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err), param_hint="--profile") from err
    timing = TimingModel(card, lower(cfg))
    stderr = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(f"{cfg.name} on {cards} card(s)", total=None)

        def shown(point: StudyPoint) -> None:
            verdict = "keeps up" if point.keeps_up else "too many"
            progress.update(
                task, description=f"{point.streams} streams: p99 {point.p99_ms:.1f} ms, {verdict}"
            )

        result = study(timing, cfg.name, cards, seconds=seconds, seed=seed, beam=beam, on_point=shown)
    if as_json:
        keys = ("model", "cards", "max_rts", "p99_ms_at_max", "p99_ms_at_32", "sweep")
        typer.echo(json.dumps(result.model_dump(include=set(keys))))
        return
    _print(result)


def _print(result: CapacityStudy) -> None:
    beam = f", beam {result.beam}" if result.beam > 1 else ""
    table = Table(
        title=f"{result.model} on {result.cards} x {result.profile}{beam}: {result.seconds:g} s per point"
    )
    for name in ("streams", "p50 ms", "p99 ms", "max ms", "mean batch", "utilisation", "keeps up"):
        table.add_column(name, justify="right")
    for p in result.sweep:
        table.add_row(
            str(p.streams),
            f"{p.p50_ms:.1f}",
            f"{p.p99_ms:.1f}",
            f"{p.max_ms:.1f}",
            f"{p.mean_batch:.1f}",
            f"{100 * p.utilisation:.0f}%",
            "yes" if p.keeps_up else "no",
        )
    console = Console()
    console.print(table)
    if result.max_rts:
        console.print(
            f"max real-time streams at p99 <= {LATENCY_TARGET_MS:g} ms: {result.max_rts} "
            f"(p99 {result.p99_ms_at_max:.1f} ms; {result.max_rts / result.cards:.0f} per card)"
        )
    else:
        console.print(f"not even one stream per card keeps p99 <= {LATENCY_TARGET_MS:g} ms")
