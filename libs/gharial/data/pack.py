"""Packing a corpus small: every utterance re-encoded as Ogg Opus, with a manifest beside it.

A lent GPU machine takes a working tree of at most 64 MiB, and nothing can be fetched from there; the
training audio (FLAC/WAV, ~30 kB per second) does not fit. Opus at about 16 kbit/s (2 kB per second)
keeps what the 80-mel front end sees of speech, so a whole training corpus travels. Packing is lossy:
`quality` trades size for fidelity, and `gharial data pack` reports both.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import soundfile
import torch

from gharial.data.manifest import Utterance, write_json_manifest

SAMPLE_RATE = 16000
DEFAULT_QUALITY = 0.97  # libsndfile's Opus compression level: 0.97 ≈ 16 kbit/s for 16 kHz speech


def encode_opus(audio: torch.Tensor, quality: float = DEFAULT_QUALITY) -> bytes:
    """Mono float32 16 kHz samples → an Ogg Opus file's bytes (higher quality level = smaller)."""
    buffer = io.BytesIO()
    soundfile.write(
        buffer, audio.numpy(), SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=quality
    )
    return buffer.getvalue()


def pack_corpus(
    utterances: list[Utterance], out_dir: Path, quality: float = DEFAULT_QUALITY, workers: int = 1
) -> Iterator[int]:
    """Write `out_dir/audio/<id>.opus` for each utterance (in `workers` processes: the Opus encoder
    is slow) and then `out_dir/manifest.json`, with transcripts, durations and speakers kept.
    Yields the bytes written for each utterance, in order, as it goes."""
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(utt, audio_dir / f"{utt.id}.opus", quality) for utt in utterances]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_pack_one, jobs, chunksize=4)
    packed = [
        utt.model_copy(update={"audio": path, "audio_bytes": None, "sample_rate": SAMPLE_RATE})
        for utt, path, _ in jobs
    ]
    write_json_manifest(out_dir / "manifest.json", packed, SAMPLE_RATE)


def _pack_one(job: tuple[Utterance, Path, float]) -> int:
    utt, path, quality = job
    torch.set_num_threads(1)
    data = encode_opus(utt.load_audio(SAMPLE_RATE), quality)
    path.write_bytes(data)
    return len(data)
