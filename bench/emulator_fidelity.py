"""Emulator fidelity: the timing model's capacity against CAIMAN-ASR's published numbers (issue 5).

One card profile (`--profile`, default speedster7t) prices every program; per row the capacity study
(`gharial.accelerator.capacity`, timing only) bisects for the most real-time streams at p99 frame
latency <= 25 ms and simulates 32 streams:

  - base and large on one card: max RTS within ±10% of 2000 and 800; p99 at 32 streams 15 ± 3 ms;
  - base on 1..8 cards: linear scaling (each within ±5% of cards x the one-card result) and at
    least 15,000 streams on 8 cards (CAIMAN measured 16,000 on one server);
  - beam search (informational, not an acceptance band): base and large with `--beam` against
    CAIMAN's 1300 and 500 streams.

It also measures the simulator's speed: simulated stream-seconds (streams x seconds of audio) per
wall-clock second, over every simulation the bench ran and for one large point on its own.

Run:  .venv/bin/python bench/emulator_fidelity.py             (~1-2 min on 2 cores)
      .venv/bin/python bench/emulator_fidelity.py --seconds 3 (quicker, slightly noisier)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from machine import machine_info
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gharial.accelerator.capacity import CapacityStudy, StudyPoint, simulate, study
from gharial.accelerator.layout import lower
from gharial.accelerator.profile import DEFAULT_PROFILE, load_profile
from gharial.accelerator.timing import TimingModel
from gharial.asr.config import load_model_config

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "emulator_fidelity.json"
TARGET_RTS = {"base": 2000, "large": 800}  # greedy, per card (DESIGN §9)
TARGET_BEAM_RTS = {"base": 1300, "large": 500}
RTS_BAND = 0.10  # ±10% of the target
P99_AT_32_MS, P99_AT_32_BAND_MS = 15.0, 3.0
SCALING_BAND = 0.05  # n cards: within ±5% of n x the one-card result
MIN_RTS_8_CARDS = 15_000

console = Console()
if not console.is_terminal:
    console.width = 150


class Meter:
    """Counts the stream-seconds every simulation simulates, for the simulator's speed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.stream_seconds = 0.0

    def __call__(self, point: StudyPoint) -> None:
        self.stream_seconds += point.streams * self.seconds


def within(value: float, target: float, band: float) -> bool:
    return abs(value - target) <= band


def row(result: CapacityStudy, target: int, checks: dict[str, bool], kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "model": result.model,
        "cards": result.cards,
        "beam": result.beam,
        "max_rts": result.max_rts,
        "target": target,
        "deviation": result.max_rts / target - 1,
        "p99_ms_at_max": result.p99_ms_at_max,
        "p99_ms_at_32": result.p99_ms_at_32,
        "checks": checks,
        "passed": all(checks.values()) if checks else None,
        "sweep": [p.model_dump() for p in result.sweep],
    }


def p99_ok(result: CapacityStudy) -> bool:
    p99 = result.p99_ms_at_32
    return p99 is not None and within(p99, P99_AT_32_MS, P99_AT_32_BAND_MS)


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = Table(title="emulator fidelity: max real-time streams at p99 <= 25 ms vs CAIMAN-ASR")
    for name in (
        "model",
        "cards",
        "beam",
        "max RTS",
        "target",
        "deviation",
        "p99 at max",
        "p99 at 32",
        "result",
    ):
        table.add_column(name, justify="right")
    for r in rows:
        verdict = "info" if r["passed"] is None else ("[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
        failed = [name for name, ok in r["checks"].items() if not ok]
        table.add_row(
            r["model"],
            str(r["cards"]),
            str(r["beam"]),
            str(r["max_rts"]),
            str(r["target"]),
            f"{100 * r['deviation']:+.1f}%",
            "-" if r["p99_ms_at_max"] is None else f"{r['p99_ms_at_max']:.1f} ms",
            "-" if r["p99_ms_at_32"] is None else f"{r['p99_ms_at_32']:.1f} ms",
            verdict + (f" ({', '.join(failed)})" if failed else ""),
        )
    console.print(table)


def main(
    profile: Annotated[
        str, typer.Option(help="card profile: a named profile or a profile YAML")
    ] = DEFAULT_PROFILE,
    seconds: Annotated[float, typer.Option(help="seconds of audio simulated per stream count")] = 10.0,
    seed: Annotated[int, typer.Option(help="seed for phases, jitter and token emissions")] = 0,
    max_cards: Annotated[int, typer.Option(min=1, help="scale base from 1 to this many cards")] = 8,
    beam: Annotated[int, typer.Option(min=1, help="beam width of the informational beam rows (1: none)")] = 4,
    out: Annotated[Path, typer.Option(help="JSON results file")] = DEFAULT_OUT,
) -> None:
    """Capacity of base and large on one card profile vs CAIMAN-ASR (see the module docstring)."""
    card = load_profile(profile)
    machine = machine_info()
    console.print(
        f"[bold]emulator fidelity[/] with profile {card.name}, {seconds:g} s per point, seed {seed}; "
        f"{machine['cpu']} ({machine['cpu_count']} CPUs), load average {machine['loadavg_start']:.2f}"
    )
    timings = {name: TimingModel(card, lower(load_model_config(name))) for name in TARGET_RTS}
    plan: list[tuple[str, str, int, int]] = [("model", name, 1, 1) for name in TARGET_RTS]
    plan += [("scaling", "base", n, 1) for n in range(2, max_cards + 1)]
    if beam > 1:
        plan += [("beam", name, 1, beam) for name in TARGET_BEAM_RTS]
    meter = Meter(seconds)
    started = time.perf_counter()
    results: dict[tuple[str, int, int], CapacityStudy] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("capacity studies", total=len(plan))
        for _, name, cards, width in plan:
            bar.update(task, description=f"{name}, {cards} card(s), beam {width}")
            results[name, cards, width] = study(
                timings[name], name, cards, seconds=seconds, seed=seed, beam=width, on_point=meter
            )
            bar.advance(task)
    elapsed = time.perf_counter() - started

    rows = []
    one_card = results["base", 1, 1].max_rts
    for kind, name, cards, width in plan:
        result = results[name, cards, width]
        if kind == "model":
            checks = {
                "rts ±10%": within(result.max_rts, TARGET_RTS[name], RTS_BAND * TARGET_RTS[name]),
                "p99@32 15±3 ms": p99_ok(result),
            }
            rows.append(row(result, TARGET_RTS[name], checks, kind))
        elif kind == "scaling":
            checks = {"linear ±5%": within(result.max_rts, cards * one_card, SCALING_BAND * cards * one_card)}
            if cards == 8:
                checks[f">= {MIN_RTS_8_CARDS}"] = result.max_rts >= MIN_RTS_8_CARDS
            rows.append(row(result, cards * TARGET_RTS[name], checks, kind))
        else:
            rows.append(row(result, TARGET_BEAM_RTS[name], {}, kind))
    print_rows(rows)

    # the simulator's speed on one large point: base at max RTS on every card
    streams = results["base", max_cards, 1].max_rts
    tick = time.perf_counter()
    simulate(timings["base"], streams, max_cards, seconds=seconds, seed=seed)
    point_rate = streams * seconds / (time.perf_counter() - tick)
    overall_rate = meter.stream_seconds / elapsed
    console.print(
        f"simulator speed: {overall_rate:,.0f} stream-seconds per wall second over all "
        f"{meter.stream_seconds:,.0f} simulated stream-seconds ({elapsed:.0f} s); "
        f"{point_rate:,.0f} for {streams} base streams on {max_cards} cards alone"
    )
    failed = [r for r in rows if r["passed"] is False]
    console.print(
        "[green]all acceptance bands met[/]" if not failed else f"[red]{len(failed)} row(s) failed[/]"
    )

    report = {
        "machine": machine | {"loadavg_end": os.getloadavg()[0]},
        "settings": {"profile": card.model_dump(), "seconds": seconds, "seed": seed, "beam": beam},
        "rows": rows,
        "simulator": {
            "stream_seconds": meter.stream_seconds,
            "elapsed_s": elapsed,
            "stream_seconds_per_s": overall_rate,
            "one_point": {"streams": streams, "cards": max_cards, "stream_seconds_per_s": point_rate},
        },
        "all_passed": not failed,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
