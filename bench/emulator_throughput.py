"""Emulator throughput: how many streams one emulated card sustains on this machine.

Two modes of `gharial.accelerator.card.Card` (in process; the gRPC layer is measured by the serving
benchmarks), each driven by N streams that keep exactly one frame in flight (a stream submits its
next frame as soon as its previous result arrives, as fast as the card answers):

  compute      the bundled model compiled to a program, real speech features (one speech-dev
               utterance per stream, looped), the program's int16 arithmetic on every frame;
  timing-only  the same program, no arithmetic: only the timing model and the card's bookkeeping.

Per N: stream-frames per second of wall time, the mean batch size, and "real-time streams" =
frames/s / (1000 / 60) — how many live streams that rate would carry (each needs one frame per
60 ms). For timing-only mode the simulated seconds of audio per wall second is the same number.

Run:  .venv/bin/python bench/emulator_throughput.py [--seconds 5] [--threads 2]
Results: a table, and bench/results/emulator_throughput.json.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from machine import machine_info
from rich.console import Console
from rich.table import Table

from gharial.accelerator.card import Card, CardMode, FrameOutcome
from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.profile import load_profile
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.features import FeatureExtractor
from gharial.asr.pipeline import bundled_checkpoint
from gharial.audio import load_audio

SPEECH_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech-dev"
RESULTS = Path(__file__).parent / "results" / "emulator_throughput.json"
FRAMES_PER_SECOND = 1000 / 60


def speech_frames(ckpt: HardwareCheckpoint, n: int) -> list[np.ndarray]:
    """Feature frames [frames, 2·F] of the first n speech-dev utterances."""
    manifest = json.loads((SPEECH_DEV / "manifest.json").read_text())
    extractor = FeatureExtractor(ckpt.config.features, ckpt.meta.mel_stats)
    out = []
    for entry in manifest[:n]:
        features = extractor(load_audio(SPEECH_DEV / entry["files"][0]["fname"]))
        out.append(features.reshape(len(features) // 2, -1).numpy().astype("<f4"))
    return out


def drive(card: Card, streams: int, frames: list[np.ndarray], seconds: float) -> dict[str, float]:
    """N streams, one frame in flight each, for `seconds` of wall time → rate and batch size."""
    ids = [card.open_stream() for _ in range(streams)]
    done = threading.Event()
    count, batch_total, lock = [0], [0], threading.Lock()
    next_frame = dict.fromkeys(ids, 0)
    utterance = {s: frames[k % len(frames)] for k, s in enumerate(ids)}

    def send(stream_id: int) -> None:
        t = next_frame[stream_id]
        features = utterance[stream_id][t % len(utterance[stream_id])].tobytes()
        card.submit(stream_id, t, features, t % len(utterance[stream_id]) == 0 and t > 0, deliver)

    def deliver(outcome: FrameOutcome) -> None:
        assert not outcome.error, outcome.message
        with lock:
            count[0] += 1
            batch_total[0] += outcome.batch_size
        next_frame[outcome.stream_id] += 1
        if not done.is_set():
            send(outcome.stream_id)

    started = time.perf_counter()
    for s in ids:
        send(s)
    time.sleep(seconds)
    done.set()
    elapsed = time.perf_counter() - started
    time.sleep(0.5)  # let frames in flight land before the streams close
    for s in ids:
        card.close_stream(s)
    rate = count[0] / elapsed
    return {
        "streams": streams,
        "frames_per_s": rate,
        "mean_batch": batch_total[0] / max(count[0], 1),
        "real_time_streams": rate / FRAMES_PER_SECOND,
    }


def main(
    seconds: Annotated[float, typer.Option(help="wall seconds per measurement")] = 5.0,
    threads: Annotated[int, typer.Option(help="torch threads for the arithmetic")] = 2,
    streams: Annotated[str, typer.Option(help="comma-separated stream counts")] = "1,16,64,256,1024",
) -> None:
    """Measure the emulated card's throughput in compute and timing-only modes."""
    torch.set_num_threads(threads)
    ckpt = HardwareCheckpoint.load(bundled_checkpoint())
    program = compile_checkpoint(ckpt).to_bytes()
    frames = speech_frames(ckpt, 16)
    rows: list[dict[str, Any]] = []
    for mode in ("compute", "timing_only"):
        card_mode: CardMode = "compute" if mode == "compute" else "timing_only"
        card = Card(f"bench-{mode}", load_profile("speedster7t"), mode=card_mode)
        card.load_program(program)
        for n in (int(x) for x in streams.split(",")):
            rows.append({"mode": mode, **drive(card, n, frames, seconds)})
        card.shutdown()

    table = Table(title=f"Emulated card throughput (en-small, {threads} torch threads, {seconds:g} s each)")
    for column in ("mode", "streams", "frames/s", "mean batch", "real-time streams"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["mode"],
            str(r["streams"]),
            f"{r['frames_per_s']:,.0f}",
            f"{r['mean_batch']:.1f}",
            f"{r['real_time_streams']:,.0f}",
        )
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))


if __name__ == "__main__":
    typer.run(main)
