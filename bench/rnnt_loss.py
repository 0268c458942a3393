"""RNN-T loss: the whole lattice against the pruned loss, on training batches' real shapes.

Why: on the 2 CPU cores the joint network, its softmax and the loss's gradient over the whole
[B, T, U+1, V+1] lattice are most of a training step (the encoder well under a fifth). The pruned
loss (`gharial.asr.pruned_loss`) runs the joint only on `--prune-range` token positions a frame.
This measures both, forward and backward, side by side in one process, on the bundled model's
joint and prediction-network sizes.

Batches are cut from the training manifests exactly as `gharial train` cuts them (32 utterances,
sorted within buckets of 32 batches): each utterance's frames (duration / 60 ms) and token count
(its transcript through the bundled tokenizer) are real; the encoder and prediction-network
outputs are random (the cost does not depend on their values). Reported per batch: milliseconds
(median of `--repeats`), audio seconds per second of loss computation, and the largest tensor
(the logits) in MB.

Results: a rich table and bench/results/rnnt_loss.json.

Run:  .venv/bin/python bench/rnnt_loss.py
      .venv/bin/python bench/rnnt_loss.py --batches 8 --prune-range 4 --prune-range 8
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the trainer's default `threads`

import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import torch
import typer
from accuracy import RESULTS, console
from machine import machine_info
from rich.table import Table
from torch import nn

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.loss import rnnt_loss
from gharial.asr.model import RNNT
from gharial.asr.pipeline import bundled_checkpoint
from gharial.asr.pruned_loss import pruned_rnnt_loss
from gharial.asr.tokenizer import Tokenizer
from gharial.data.manifest import read_json_manifest
from gharial.training.batches import epoch_batches

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TRAIN_SETS = ("cathy", "arctic-bdl", "arctic-slt", "barista", "fsdd")
MANIFESTS = [SHARED / f"train-{name}" / "manifest.json" for name in TRAIN_SETS]
MANIFESTS.append(ROOT / "data" / "synth-v1" / "manifest.json")
DEFAULT_OUT = RESULTS / "rnnt_loss.json"
FRAME_S = 0.06
BATCH_SIZE = 32


def batch_shapes(tokenizer: Tokenizer, count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(frames, tokens) per utterance of `count` training batches."""
    utterances = [u for m in MANIFESTS if m.exists() for u in read_json_manifest(m)]
    durations = [u.duration for u in utterances]
    batches = epoch_batches(durations, BATCH_SIZE, seed, epoch=0)[:count]
    if len(batches) < count:  # no shared data, or fewer batches than asked
        found = ", ".join(str(m) for m in MANIFESTS if m.exists()) or "none"
        raise typer.BadParameter(f"{count} batches wanted, {len(batches)} in the training manifests: {found}")
    return [
        ([math.ceil(utterances[i].duration / FRAME_S) for i in rows],
         [len(tokenizer.encode(utterances[i].transcript)) for i in rows])
        for rows in batches
    ]  # fmt: skip


def timed(fn: Callable[[], None], repeats: int) -> float:
    """Median wall seconds of fn() (forward and backward)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_batch(
    model: RNNT, heads: tuple[nn.Linear, nn.Linear], frames: list[int], tokens: list[int],
    prune_ranges: list[int], repeats: int, g: torch.Generator,
) -> list[tuple[float, float]]:  # fmt: skip
    """(seconds, largest tensor in MB) of the whole-lattice loss, then of each pruned loss."""
    b, t, u = len(frames), max(frames), max(tokens)
    vocab = model.cfg.vocab_size + 1
    enc = torch.randn(b, t, model.cfg.encoder.hidden, generator=g, requires_grad=True)
    pred = torch.randn(b, u + 1, model.cfg.predictor.hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, model.cfg.vocab_size, (b, u), generator=g)
    t_len, u_len = torch.tensor(frames), torch.tensor(tokens)

    def whole_lattice() -> None:
        logits = model.joint(enc, pred)
        rnnt_loss(logits, targets, t_len, u_len, model.blank_id, reduction="sum").backward()

    def pruned(s_range: int) -> None:
        simple, loss = pruned_rnnt_loss(
            model.joint,
            enc,
            pred,
            heads[0](enc),
            heads[1](pred),
            targets,
            t_len,
            u_len,
            model.blank_id,
            s_range,
        )
        (loss.sum() + 0.5 * simple.sum()).backward()

    megabytes = 4 / 1e6 * b * t * vocab  # per token position of the logits, float32
    results = [(timed(whole_lattice, repeats), megabytes * (u + 1))]
    for s in prune_ranges:
        results.append((timed(functools.partial(pruned, s), repeats), megabytes * min(s, u + 1)))
    return results


def main(
    batches: Annotated[int, typer.Option(help="training batches to time")] = 6,
    prune_range: Annotated[list[int], typer.Option(help="pruned loss windows to time (repeatable)")] = [4, 8],  # noqa: B006
    repeats: Annotated[int, typer.Option(help="timings per batch and loss (median kept)")] = 3,
    seed: Annotated[int, typer.Option(help="which batches (the training seed)")] = 1,
    json_out: Annotated[Path, typer.Option(help="where to write the results")] = DEFAULT_OUT,
) -> None:
    """Time the full and the pruned RNN-T loss on training batches' shapes."""
    hw = HardwareCheckpoint.load(bundled_checkpoint())
    model = RNNT(hw.config)
    model.load_state_dict(hw.state_dict)
    vocab = hw.config.vocab_size + 1
    heads = (nn.Linear(hw.config.encoder.hidden, vocab), nn.Linear(hw.config.predictor.hidden, vocab))
    shapes = batch_shapes(Tokenizer.from_bytes(hw.tokenizer_model), batches, seed)
    g = torch.Generator().manual_seed(seed)
    systems = ["whole lattice", *(f"pruned, {s} tokens a frame" for s in prune_range)]
    seconds = [0.0] * len(systems)
    largest_mb = [0.0] * len(systems)
    audio_seconds = 0.0
    for frames, tokens in shapes:
        audio_seconds += sum(frames) * FRAME_S
        for i, (spent, mb) in enumerate(time_batch(model, heads, frames, tokens, prune_range, repeats, g)):
            seconds[i] += spent
            largest_mb[i] = max(largest_mb[i], mb)

    table = Table(title=f"RNN-T loss, forward + backward: {batches} training batches ({audio_seconds:.0f} s)")
    for column in ("loss", "ms per batch", "audio s per s", "speed-up", "largest tensor (MB)"):
        table.add_column(column, justify="left" if column == "loss" else "right")
    rows = []
    for name, spent, mb in zip(systems, seconds, largest_mb, strict=True):
        row = {
            "loss": name,
            "ms_per_batch": 1000 * spent / batches,
            "audio_seconds_per_second": audio_seconds / spent,
            "speed_up": seconds[0] / spent,
            "largest_tensor_mb": mb,
        }
        rows.append(row)
        table.add_row(
            name,
            f"{row['ms_per_batch']:.0f}",
            f"{row['audio_seconds_per_second']:.0f}",
            f"{row['speed_up']:.1f}x",
            f"{mb:.1f}",
        )
    console.print(table)
    result = {
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "batches": batches,
        "audio_seconds": audio_seconds,
        "most_tokens": max(max(tokens) for _, tokens in shapes),  # the widest lattice has one more row
        "rows": rows,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    typer.run(main)
