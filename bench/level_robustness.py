"""Level robustness: word error rate against input level, with and without automatic gain.

Why: a live microphone can deliver speech 30-40 dB quieter than a studio recording, and speech-dev
itself holds three utterances (fleurs_en_004/006/007) at -68 to -59 dBFS RMS, far below any read
or crowd speech in training (-34 dBFS and up). The features are log-mels normalised by fixed
training statistics, so a level change shifts every feature by the same constant; a model that
never heard that shift hears silence. This benchmark measures how much each checkpoint loses, as
the audio is (`--no-auto-gain`, the baseline) and with the front end's automatic gain
(`gharial.asr.level`, on by default in every server and CLI), side by side in one process.

Every speech-dev utterance is scaled by each `--offset-db` (relative to its own recording, so 0 is
speech-dev as it is), clipped to ±1 and written as 16-bit PCM, as a microphone delivers it (so
quieter audio also loses resolution), then decoded by `gharial.validation.validate`: greedy, the
streaming decoder the servers run with their default state resets (every 15 s, 3 s overlap),
utterances batched in lock-step. Reported for the seen speaker
and the unseen speakers separately (the split of `accuracy.py`), with each set's median RMS level.

Each utterance is a stream of its own by default: the hardest case for a causal level estimate,
which has only the utterance's first syllables to go on. `--session-length K` joins K consecutive
utterances of a set into one stream (a session: a user speaking for a while into the same
microphone), so the estimate carries over from one utterance to the next, as in production.

The bundled model is always the first system (the baseline); `--checkpoint` adds others. Each
checkpoint runs twice: as is and "+ auto gain".

Results: a rich table and bench/results/level_robustness.json (per checkpoint, set and offset: WER,
errors, words; the hypotheses of every utterance beside them).

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/level_robustness.py --checkpoint runs/stage11.hwckpt
      .venv/bin/python bench/level_robustness.py --session-length 5 --json-out bench/results/sessions.json
      .venv/bin/python bench/level_robustness.py --offset-db 0 --offset-db -30 --limit 5   (smoke run)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import io
import json
import time
from pathlib import Path
from statistics import median
from typing import Annotated, Any

import numpy as np
import soundfile
import torch
import typer
from accuracy import DEFAULT_SPEECH_DEV, RESULTS, SAMPLE_RATE, console, load_speech_dev_sets
from machine import machine_info
from rich.table import Table

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.level import DEFAULT_AUTO_GAIN, AutoGainConfig
from gharial.asr.pipeline import bundled_checkpoint
from gharial.asr.streaming import SERVER_STREAMING
from gharial.data.manifest import Utterance
from gharial.validation import ValidationReport, validate

DEFAULT_OUT = RESULTS / "level_robustness.json"
DEFAULT_OFFSETS = [0.0, -10.0, -20.0, -30.0, -40.0]


def at_level(utterance: Utterance, offset_db: float) -> tuple[Utterance, float]:
    """The utterance scaled by `offset_db`, held in memory as a 16-bit PCM WAV file, and its RMS level
    in dBFS after scaling."""
    audio = (utterance.load_audio(SAMPLE_RATE).numpy() * 10 ** (offset_db / 20)).clip(-1.0, 1.0)
    pcm = np.round(audio * 32767).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    rms = float(np.sqrt(np.mean((pcm / 32768.0) ** 2))) if len(pcm) else 0.0
    level = 20 * np.log10(max(rms, 1e-10))
    return utterance.model_copy(update={"audio_bytes": buffer.getvalue(), "sample_rate": None}), level


def session_of(utterances: list[Utterance]) -> Utterance:
    """The utterances one after another as one utterance (one stream), held in memory as float WAV."""
    audio = np.concatenate([u.load_audio(SAMPLE_RATE).numpy() for u in utterances])
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return Utterance(
        id="+".join(u.id for u in utterances),
        audio=utterances[0].audio,
        transcript=" ".join(u.transcript for u in utterances),
        duration=len(audio) / SAMPLE_RATE,
        audio_bytes=buffer.getvalue(),
    )


def load_checkpoint(path: Path) -> HardwareCheckpoint:
    """The checkpoint, or a usage error naming the file and what is wrong with it (before any decoding)."""
    try:
        return HardwareCheckpoint.load(path)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        raise typer.BadParameter(str(err), param_hint="--checkpoint") from err


def main(
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(help="a hardware checkpoint (.hwckpt) to compare with the bundled model; repeatable"),
    ] = None,
    offset_db: Annotated[
        list[float] | None,
        typer.Option(
            help="a level offset in dB applied to every utterance; repeatable (default 0 -10 -20 -30 -40)"
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="only the first N utterances of each set (quick runs)")
    ] = None,
    session_length: Annotated[
        int,
        typer.Option(
            min=1, help="join this many consecutive utterances of a set into one stream (1: each its own)"
        ),
    ] = 1,
    speech_dev: Annotated[
        Path, typer.Option(help="speech-dev manifest (split into seen/unseen speakers by `source`)")
    ] = DEFAULT_SPEECH_DEV,
    json_out: Annotated[Path, typer.Option(help="JSON results to write")] = DEFAULT_OUT,
) -> None:
    """Greedy WER of the bundled model and each --checkpoint, with and without automatic gain, on
    speech-dev at each level offset."""
    offsets = offset_db or DEFAULT_OFFSETS
    torch.set_num_threads(1)
    machine = machine_info()
    console.print(f"[bold]level robustness[/] on {machine['cpu']}, torch {machine['torch']} on 1 thread")
    started = time.perf_counter()
    paths = [bundled_checkpoint(), *(checkpoint or [])]
    names = ["bundled", *(p.stem for p in checkpoint or [])]
    if len(set(names)) < len(names):
        raise typer.BadParameter("two checkpoints share a file name (the table's row label)")
    models = {name: load_checkpoint(path) for name, path in zip(names, paths, strict=True)}
    systems: dict[str, tuple[HardwareCheckpoint, AutoGainConfig | None]] = {}
    for name, loaded in models.items():
        systems[name] = (loaded, None)
        systems[f"{name} + auto gain"] = (loaded, DEFAULT_AUTO_GAIN)
    sets = load_speech_dev_sets(speech_dev)
    for s in sets:
        kept = s.utterances[:limit]
        s.utterances = [session_of(kept[i : i + session_length]) for i in range(0, len(kept), session_length)]
    sets = [s for s in sets if s.utterances]  # a manifest may hold only one of the two groups
    if not sets:
        raise typer.BadParameter(f"no utterances read from {speech_dev}", param_hint="--speech-dev")
    scaled: dict[tuple[str, float], list[Utterance]] = {}
    levels: dict[tuple[str, float], float] = {}
    for s in sets:
        for offset in offsets:
            pairs = [at_level(u, offset) for u in s.utterances]
            scaled[s.name, offset] = [u for u, _ in pairs]
            levels[s.name, offset] = median(level for _, level in pairs)

    reports: dict[str, dict[tuple[str, float], ValidationReport]] = {}
    for name, (loaded, auto_gain) in systems.items():
        reports[name] = {}
        for key, utterances in scaled.items():
            with console.status(f"{name}: {key[0]} at {key[1]:+.0f} dB"):
                report = validate(loaded, utterances, streaming=SERVER_STREAMING, auto_gain=auto_gain)
            reports[name][key] = report
            console.print(f"  {name:30} {key[0]:18} {key[1]:+4.0f} dB  WER {report.wer:6.1%}")

    streams = "each utterance a stream" if session_length == 1 else f"{session_length} utterances a stream"
    table = Table(title=f"Greedy WER % by level offset (median RMS dBFS); {streams}")
    table.add_column("checkpoint")
    table.add_column("test set")
    for offset in offsets:
        table.add_column(f"{offset:+.0f} dB", justify="right")
    for name in systems:
        for j, s in enumerate(sets):
            cells = [f"{100 * reports[name][s.name, o].wer:.1f} ({levels[s.name, o]:.0f})" for o in offsets]
            table.add_row(name if j == 0 else "", s.name, *cells, end_section=j == len(sets) - 1)
    console.print(table)

    summary: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "offsets_db": offsets,
            "limit": limit,
            "session_length": session_length,
            "speech_dev": str(speech_dev),
            "auto_gain": DEFAULT_AUTO_GAIN.model_dump(),
        },
        "checkpoints": {name: str(path) for name, path in zip(names, paths, strict=True)},
        "median_rms_dbfs": {s.name: {str(o): levels[s.name, o] for o in offsets} for s in sets},
        "results": {
            name: {
                s.name: {str(o): reports[name][s.name, o].model_dump(exclude={"results"}) for o in offsets}
                for s in sets
            }
            for name in systems
        },
        "hypotheses": {
            name: {
                f"{key[0]} {key[1]:+.0f} dB": [u.model_dump() for u in r.results] for key, r in by_key.items()
            }
            for name, by_key in reports.items()
        },
        "elapsed_s": time.perf_counter() - started,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {json_out} ({summary['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    typer.run(main)
