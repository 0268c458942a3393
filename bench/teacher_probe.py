"""How much of the distillation teacher does a checkpoint's encoder hold? A linear probe: least
squares from the (frozen) encoder output at frame t + delay to the teacher's standardised frame t,
fitted on some training utterances and scored on others (mean cosine and R²), for several
checkpoints side by side. Distillation (`distill_weight`) should raise it; the best delay says how
far behind the bidirectional teacher our streaming encoder can follow.

    .venv/bin/python bench/teacher_probe.py --checkpoint a.hwckpt --checkpoint b.hwckpt
    .venv/bin/python bench/teacher_probe.py --help          # every flag

Needs a teacher store (`gharial data teacher`, default data/teacher-whisper-tiny). Prints a table;
writes bench/results/teacher_probe.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated

import torch
import typer
from machine import machine_info
from rich.console import Console
from rich.table import Table
from torch import Tensor
from tqdm import tqdm

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.features import FeatureExtractor
from gharial.asr.pipeline import bundled_checkpoint
from gharial.data.readers import read_utterances
from gharial.data.teacher import TeacherStore

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).parent / "results" / "teacher_probe.json"
DEFAULT_MANIFESTS = [
    REPO.parent / "shared/data/train-cathy/manifest.json",
    REPO.parent / "shared/data/train-arctic-bdl/manifest.json",
    REPO / "data/synth-v1/manifest.json",
]
DELAYS = [0, 1, 2, 3, 4, 6]
console = Console(width=140)


def encoder_outputs(ckpt: HardwareCheckpoint, audios: list[Tensor]) -> list[Tensor]:
    """[frames, hidden] per utterance, one utterance at a time (no padding in the recurrence)."""
    model = ckpt.build_model()
    features = FeatureExtractor(ckpt.config.features, ckpt.meta.mel_stats)
    with torch.no_grad():
        return [model.encoder(features(audio)[None])[0][0] for audio in audios]


def aligned(encs: list[Tensor], targets: list[Tensor], delay: int) -> tuple[Tensor, Tensor]:
    """Encoder frames t + delay (with a constant 1 for the bias) beside teacher frames t."""
    xs, ys = [], []
    for enc, target in zip(encs, targets, strict=True):
        n = min(len(enc) - delay, len(target))
        xs.append(torch.cat([enc[delay : delay + n], torch.ones(n, 1)], 1))
        ys.append(target[:n])
    return torch.cat(xs), torch.cat(ys)


def probe(encs: list[Tensor], targets: list[Tensor], fit: int, delay: int) -> dict[str, float]:
    """Held-out mean cosine and R² of the least-squares map fitted on the first `fit` utterances."""
    x, y = aligned(encs[:fit], targets[:fit], delay)
    weights = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    x_test, y_test = aligned(encs[fit:], targets[fit:], delay)
    predicted = x_test @ weights
    cosine = torch.nn.functional.cosine_similarity(predicted, y_test, dim=-1).mean()
    r2 = 1 - (predicted - y_test).pow(2).sum() / (y_test - y_test.mean(0)).pow(2).sum()
    return {"cosine": round(float(cosine), 4), "r2": round(float(r2), 4)}


def main(
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", help="hardware checkpoint; repeat; default: the bundled model"),
    ] = None,
    teacher: Annotated[
        Path, typer.Option(help="teacher store holding every probed utterance (gharial data teacher)")
    ] = REPO / "data/teacher-whisper-tiny",
    manifest: Annotated[
        list[Path] | None,
        typer.Option("--manifest", help="utterances to probe on (training data: the store has only those)"),
    ] = None,
    utterances: Annotated[int, typer.Option(min=20, help="random utterances drawn from the manifests")] = 500,
    test_fraction: Annotated[float, typer.Option(min=0.05, max=0.9, help="held out for scoring")] = 0.2,
    delay: Annotated[list[int], typer.Option("--delay", help="encoder frames behind; repeat")] = DELAYS,
    seed: Annotated[int, typer.Option(help="seed of the utterance draw")] = 0,
    out: Annotated[Path, typer.Option(help="JSON results file")] = DEFAULT_OUT,
) -> None:
    torch.set_num_threads(1)
    store = TeacherStore(teacher)
    pool = [u for m in manifest or DEFAULT_MANIFESTS for u in read_utterances(m)]
    drawn = random.Random(seed).sample(pool, min(utterances, len(pool)))
    audios = [u.load_audio(16000) for u in tqdm(drawn, desc="audio")]
    targets = [store.frames(u.id) for u in drawn]
    fit = round(len(drawn) * (1 - test_fraction))
    paths = checkpoint or [bundled_checkpoint()]
    results: dict[str, dict[int, dict[str, float]]] = {}
    for path in tqdm(paths, desc="checkpoints"):
        encs = encoder_outputs(HardwareCheckpoint.load(path), audios)
        results[str(path)] = {d: probe(encs, targets, fit, d) for d in delay}

    table = Table(title=f"linear probe of {store.index.teacher}: held-out cosine / R²")
    table.add_column("checkpoint")
    for d in delay:
        table.add_column(f"delay {d} ({60 * d} ms)", justify="right")
    for path, by_delay in results.items():
        table.add_row(Path(path).name, *(f"{r['cosine']:.3f} / {r['r2']:.3f}" for r in by_delay.values()))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "teacher": store.index.teacher,
                "utterances": {"fit": fit, "held_out": len(drawn) - fit},
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
