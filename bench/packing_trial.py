"""Does the load-time packing trial pay? A checkpoint's `Recognizer.step` with the layers
`prepack_for_cpu` packs by default (large ones always, small ones where `packing_pays` finds
packing faster on this CPU) against large layers only (what every earlier session ran), on the same
random features, steps interleaved in one process so a slow spell hits both alike.

    .venv/bin/python bench/packing_trial.py                 # the bundled en-small, 1 and 2 threads
    .venv/bin/python bench/packing_trial.py --help          # every flag

Prints a table; writes bench/results/packing_trial.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from core_throughput import random_features, recognizer_stepper, time_steppers
from machine import machine_info
from rich.console import Console
from rich.table import Table

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.model import RNNT
from gharial.asr.pipeline import bundled_checkpoint
from gharial.asr.prepacked import PackedLinear, PackedLSTM, prepack_for_cpu

DEFAULT_OUT = Path(__file__).parent / "results" / "packing_trial.json"
THREADS = [1, 2]  # the cpu backend's transcriber steps on 1 thread by default
BATCHES = [1, 16, 64, 128]
console = Console()


def packed_layers(model: RNNT) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PackedLSTM | PackedLinear)]


def time_steps(models: dict[str, RNNT], batch: int, steps: int, warmup: int, seed: int) -> dict[str, float]:
    """Median ms per `Recognizer.step` over `batch` fresh greedy streams, for each model in turn:
    core_throughput's steppers and interleaved schedule, on the same random features."""
    features = random_features(next(iter(models.values())), warmup + steps, batch, seed)
    steppers = {key: (True, recognizer_stepper(m, batch, 2, features)) for key, m in models.items()}
    return {key: t.median for key, t in time_steppers(steppers, batch, warmup, steps).items()}


def main(
    checkpoint: Annotated[
        Path | None, typer.Option(help="hardware checkpoint; default: the bundled model")
    ] = None,
    threads: Annotated[
        list[int], typer.Option("--threads", help="torch threads; repeat for several")
    ] = THREADS,
    batches: Annotated[
        list[int], typer.Option("--batch", help="streams per step; repeat for several")
    ] = BATCHES,
    steps: Annotated[int, typer.Option(help="timed steps per measurement (median over them)")] = 50,
    warmup: Annotated[int, typer.Option(help="untimed steps before each measurement")] = 10,
    seed: Annotated[int, typer.Option(help="seed for the random features")] = 0,
    out: Annotated[Path, typer.Option(help="JSON results file")] = DEFAULT_OUT,
) -> None:
    """Recognizer.step with trial-chosen packing vs large layers packed only (module docstring)."""
    loaded = HardwareCheckpoint.load(checkpoint or bundled_checkpoint())
    machine = machine_info()
    console.print(f"packing trial on {machine['cpu']} ({machine['cpu_count']} CPUs), {loaded.config.name}")
    table = Table(
        "threads", "B", "large only ms", "trial-chosen ms", "speed-up", title="Recognizer.step, median"
    )
    rows: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    for n in threads:
        torch.set_num_threads(n)
        begin = time.perf_counter()
        chosen = prepack_for_cpu(loaded.build_model())
        trial_s = time.perf_counter() - begin
        models = {"large_only": prepack_for_cpu(loaded.build_model(), pays=None), "trial_chosen": chosen}
        trials.append({"threads": n, "packed": packed_layers(chosen), "load_seconds": trial_s})
        console.print(f"{n} thread(s): packed {packed_layers(chosen)}, loaded in {trial_s:.2f} s")
        for batch in batches:
            ms = time_steps(models, batch, steps, warmup, seed)
            speedup = ms["large_only"] / ms["trial_chosen"]
            table.add_row(
                str(n), str(batch), f"{ms['large_only']:.2f}", f"{ms['trial_chosen']:.2f}", f"{speedup:.2f}x"
            )
            rows.append(
                {"threads": n, "batch": batch, **{f"{k}_ms": v for k, v in ms.items()}, "speedup": speedup}
            )
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": machine, "checkpoint": str(checkpoint), "trials": trials, "rows": rows}, indent=2
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
