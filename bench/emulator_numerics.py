"""Emulator numerics: does the card's arithmetic (int16 weights and activations, exact accumulation,
float16 state) transcribe like the CPU backend's float32 model?

The hardware checkpoint (`--checkpoint`, default the bundled model) is compiled to a program, and the
utterances of a manifest (default /work/shared/data/speech-dev, `--limit` for the first N) are
decoded greedily twice, each time with every utterance advancing one 60 ms frame per step in
lock-step, as concurrent streams do on a server:

  cpu   the CPU backend: `gharial.validation.decode_in_lockstep` (streaming Recognizer +
        GreedyDecoder on the float32 model), exactly as `gharial validate` decodes;
  card  `gharial.accelerator.executor.ProgramExecutor.run_batch` on the program: one batch per
        frame holding every utterance that still has audio, as the emulator batches a frame window.

Reported:
  token agreement   1 − Σ token edit distance(cpu, card) / Σ cpu tokens: how many of the CPU
                    backend's tokens the card reproduces, position by position over the alignment;
  identical         utterances whose token sequences are equal;
  decisions         teacher-forced: every joint decision (argmax) of the CPU backend's greedy
                    decoding, with the card deciding from the same history (the CPU's tokens fed to
                    both prediction networks), so one disagreement cannot change what follows; with
                    the CPU's margin (best − second-best logit) of each: agreement overall, the share
                    of near-ties (margin < NEAR_TIE) and the largest margin the card ever disagreed at.
                    This separates the arithmetic's error from a model's sensitivity to it: an
                    undertrained model has many near-ties, and in a burst of tokens one flipped
                    near-tie changes every later token of the frame;
  WER               of each against the reference transcripts (Whisper's English normaliser, as
                    `gharial validate`), and card − cpu in points;
  frames/s          stream-frames per second of the executor (features excluded), 1 torch thread.

Targets (the emulator's accuracy claim, DESIGN §4): token agreement ≥ 99%, |WER difference| ≤ 0.5
points. Results: a table, and bench/results/emulator_numerics.json.

Run:  .venv/bin/python bench/emulator_numerics.py --limit 40
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
from machine import machine_info
from rich.console import Console
from rich.table import Table
from torch import Tensor

from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.executor import ProgramExecutor, teacher_forced_decisions
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.decoding.base import Token
from gharial.asr.pipeline import SpeechToText, bundled_checkpoint
from gharial.data.readers import read_utterances
from gharial.validation import decode_in_lockstep, edit_distance, report, score

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "emulator_numerics.json"
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "speech-dev" / "manifest.json"
TARGET_AGREEMENT = 0.99
TARGET_WER_POINTS = 0.5
NEAR_TIE = 0.1  # logits

console = Console()


def decode_on_card(executor: ProgramExecutor, features: list[Tensor], eos: int | None) -> list[list[Token]]:
    """Tokens of each utterance from the executor, all utterances stepping one frame per batch."""
    layout = executor.layout
    per_frame, max_symbols = layout.features_per_frame, layout.max_symbols_per_step
    frames = [len(f) // per_frame for f in features]
    state = executor.new_state(len(features))
    executor.reset(state, list(range(len(features))))
    tokens: list[list[Token]] = [[] for _ in features]
    for t in range(max(frames, default=0)):
        rows = [i for i, n in enumerate(frames) if t < n]
        batch = torch.stack([features[i][t * per_frame : (t + 1) * per_frame] for i in rows])
        out = executor.run_batch(state, rows, batch, [max_symbols] * len(rows))
        for i, emitted in zip(rows, out.tokens, strict=True):
            tokens[i] += [Token(token, t) for token in emitted if token != eos]
    return tokens


def main(
    checkpoint: Annotated[
        Path | None, typer.Option(help="hardware checkpoint to compile; default: the bundled model")
    ] = None,
    manifest: Annotated[Path, typer.Option(help="labelled speech (JSON manifest)")] = DEFAULT_MANIFEST,
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N utterances")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the JSON summary instead of a table")
    ] = False,
    out: Annotated[Path, typer.Option(help="where to write the JSON summary")] = DEFAULT_OUT,
) -> None:
    """Token agreement and WER of the card's arithmetic against the CPU backend (module docstring)."""
    torch.set_num_threads(1)
    machine = machine_info()
    path = checkpoint or bundled_checkpoint()
    hw = HardwareCheckpoint.load(path)
    started = time.perf_counter()
    program = compile_checkpoint(hw)
    compile_s = time.perf_counter() - started
    executor = ProgramExecutor(program)
    stt = SpeechToText(hw)  # greedy, the CPU backend

    utterances = read_utterances(manifest)[:limit]
    rate = hw.config.features.sample_rate
    features = [stt.features(u.load_audio(rate)) for u in utterances]
    frames = sum(len(f) // hw.config.features_per_frame for f in features)
    audio_s = sum(len(f) for f in features) * hw.config.features.hop_ms * hw.config.features.stack / 1000

    started = time.perf_counter()
    cpu_tokens = decode_in_lockstep(stt, features)
    cpu_s = time.perf_counter() - started
    started = time.perf_counter()
    card_tokens = decode_on_card(executor, features, stt.recognizer.eos_token_id)
    card_s = time.perf_counter() - started
    decisions = teacher_forced_decisions(stt.model, executor, features)
    decision_agreement = sum(d.agrees for d in decisions) / len(decisions)
    near_ties = sum(d.margin < NEAR_TIE for d in decisions) / len(decisions)
    worst_margin = max((d.margin for d in decisions if not d.agrees), default=None)

    cpu_ids = [[t.id for t in ts] for ts in cpu_tokens]
    card_ids = [[t.id for t in ts] for ts in card_tokens]
    distance = sum(edit_distance(a, b) for a, b in zip(cpu_ids, card_ids, strict=True))
    reference_tokens = sum(len(a) for a in cpu_ids)
    agreement = 1 - distance / reference_tokens if reference_tokens else 1.0
    identical = sum(a == b for a, b in zip(cpu_ids, card_ids, strict=True))
    ids, refs = [u.id for u in utterances], [u.transcript for u in utterances]
    cpu = report(score(ids, refs, [stt.text(t) for t in cpu_tokens]), audio_s, cpu_s)
    card = report(score(ids, refs, [stt.text(t) for t in card_tokens]), audio_s, card_s)
    wer_points = 100 * (card.wer - cpu.wer)
    summary: dict[str, Any] = {
        "machine": machine | {"loadavg_end": os.getloadavg()[0]},
        "checkpoint": str(path),
        "architecture": hw.config.name,
        "program_sha256": program.sha256,
        "manifest": str(manifest),
        "utterances": len(utterances),
        "audio_seconds": audio_s,
        "frames": frames,
        "compile_seconds": compile_s,
        "cpu_tokens": reference_tokens,
        "card_tokens": sum(len(b) for b in card_ids),
        "token_edit_distance": distance,
        "token_agreement": agreement,
        "identical_utterances": identical,
        "decisions": len(decisions),
        "decision_agreement": decision_agreement,
        "near_tie_logits": NEAR_TIE,
        "near_tie_share": near_ties,
        "largest_margin_of_a_disagreement": worst_margin,
        "cpu_wer": cpu.wer,
        "card_wer": card.wer,
        "wer_difference_points": wer_points,
        "cpu_seconds": cpu_s,
        "card_seconds": card_s,
        "card_frames_per_second": frames / card_s if card_s else 0.0,
        "targets": {"token_agreement": TARGET_AGREEMENT, "wer_difference_points": TARGET_WER_POINTS},
        "met": agreement >= TARGET_AGREEMENT and abs(wer_points) <= TARGET_WER_POINTS,
        "per_utterance": [
            {"id": i, "cpu": a, "card": b, "distance": edit_distance(a, b)}
            for i, a, b in zip(ids, cpu_ids, card_ids, strict=True)
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "per_utterance"}))
        return
    table = Table(title=f"card arithmetic vs CPU backend: {hw.config.name}, {len(utterances)} utterances")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [
        ("token agreement", f"{100 * agreement:.2f}% ({distance}/{reference_tokens} edits)",
         f">= {100 * TARGET_AGREEMENT:.0f}%"),
        ("identical utterances", f"{identical}/{len(utterances)}", ""),
        ("decisions agree (forced)", f"{100 * decision_agreement:.2f}% of {len(decisions)}", ""),
        (f"near-ties (< {NEAR_TIE} logit)", f"{100 * near_ties:.1f}%", ""),
        ("max margin of a flip", "none" if worst_margin is None else f"{worst_margin:.3f} logit", ""),
        ("WER cpu", f"{100 * cpu.wer:.2f}%", ""),
        ("WER card", f"{100 * card.wer:.2f}%", ""),
        ("WER difference", f"{wer_points:+.2f} points", f"|d| <= {TARGET_WER_POINTS}"),
        ("card frames/s", f"{frames / card_s:.0f} (1 thread)", ""),
        ("cpu frames/s", f"{frames / cpu_s:.0f}", ""),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"{'met' if summary['met'] else 'NOT met'}; wrote {out}")


if __name__ == "__main__":
    typer.run(main)
