"""Front end: the host's cost per stream for each 60 ms frame, with and without automatic gain.

Why: the transcriber computes every stream's features on the host, frame by frame: each stream's
`StreamingFeatures.take_frames` (buffering, pre-emphasis and, with automatic gain, the level
tracker and the gain), then one `FeatureExtractor.of_buffered_many` over all streams' frames (the
CPU backend's step does exactly this). The level tracker is Python per 10 ms block, so its cost is
measured here beside the baseline (`--no-auto-gain`'s front end), in one process.

`--streams` streams (default 64) each play the shipped real recording
(tests/assets/cathy_arctic_b0105, 3.4 s) at its own level ("normal": untouched by the gain) or 30 dB
down ("quiet": lifted); every frame step feeds each stream one 60 ms frame and computes the
features of all of them. Reported per stream-frame (µs) and as the share of one core that one
stream's front end takes in real time (a frame is due every 60 ms), best of `--repeats` runs.

Results: a rich table and bench/results/front_end.json.

Run:  .venv/bin/python bench/front_end.py
      .venv/bin/python bench/front_end.py --streams 256 --repeats 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import json
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from accuracy import RESULTS, SAMPLE_RATE, console
from machine import machine_info
from rich.table import Table

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.features import FeatureExtractor
from gharial.asr.level import DEFAULT_AUTO_GAIN
from gharial.asr.pipeline import bundled_checkpoint
from gharial.audio import load_audio
from gharial.data.readers import read_utterances

# the manifest of the real recording shipped with the tests (tests/assets/SOURCES.md)
SHIPPED_TAKE_MANIFEST = Path(__file__).resolve().parents[1] / "tests" / "assets" / "manifest.json"
DEFAULT_OUT = RESULTS / "front_end.json"
FRAME_S = 0.06


def seconds_per_stream_frame(extractor: FeatureExtractor, audio: torch.Tensor, streams: int) -> float:
    """Wall seconds per stream per frame to feed `streams` streams `audio` frame by frame."""
    n = extractor.samples_per_frame
    states = [extractor.stream() for _ in range(streams)]
    frames = len(audio) // n
    started = time.perf_counter()
    for i in range(frames):
        chunk = audio[i * n : (i + 1) * n]
        buffered = [state.take_frames(chunk) for state in states]
        extractor.of_buffered_many([b for b in buffered if b is not None])
    return (time.perf_counter() - started) / (frames * streams)


def main(
    streams: Annotated[int, typer.Option(min=1, help="streams fed side by side, a frame each per step")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="runs of each case; the fastest is reported")] = 3,
    json_out: Annotated[Path, typer.Option(help="JSON results to write")] = DEFAULT_OUT,
) -> None:
    """Host cost per stream-frame of the features, with automatic gain off (baseline) and on."""
    torch.set_num_threads(1)
    machine = machine_info()
    console.print(f"[bold]front end[/] on {machine['cpu']}, torch {machine['torch']} on 1 thread")
    checkpoint = HardwareCheckpoint.load(bundled_checkpoint())
    features, stats = checkpoint.meta.config.features, checkpoint.meta.mel_stats
    (take,) = read_utterances(SHIPPED_TAKE_MANIFEST)
    recording = load_audio(take.audio, SAMPLE_RATE)
    levels = {"normal": recording, "quiet (-30 dB)": recording * 10 ** (-30 / 20)}
    systems = {"as is": None, "auto gain": DEFAULT_AUTO_GAIN}
    results: dict[str, dict[str, float]] = {}
    for system, auto_gain in systems.items():
        extractor = FeatureExtractor(features, stats, auto_gain)
        results[system] = {}
        for level, audio in levels.items():
            results[system][level] = min(
                seconds_per_stream_frame(extractor, audio, streams) for _ in range(repeats)
            )

    table = Table(title=f"Front end per stream-frame, {streams} streams (µs; % of a core per stream)")
    table.add_column("front end")
    for level in levels:
        table.add_column(level, justify="right")
    for system in systems:
        cells = [f"{1e6 * s:.1f} ({100 * s / FRAME_S:.3f}%)" for s in results[system].values()]
        table.add_row(system, *cells)
    console.print(table)
    summary: dict[str, Any] = {
        "machine": machine,
        "settings": {"streams": streams, "repeats": repeats, "recording": str(take.audio)},
        "seconds_per_stream_frame": results,
        "auto_gain": DEFAULT_AUTO_GAIN.model_dump(),
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    typer.run(main)
