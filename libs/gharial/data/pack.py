"""Packing a corpus small: every utterance re-encoded as Ogg Opus, all in one Parquet file.

A lent GPU machine takes a working tree of at most 64 MiB, and nothing can be fetched from there; the
training audio (FLAC/WAV, ~30 kB per second) does not fit. Opus at about 16 kbit/s (2 kB per second)
keeps what the 80-mel front end sees of speech, so a whole training corpus travels. One Parquet file
(the Hugging Face dataset layout `gharial.data.readers` reads: `id`, `text`, `audio.bytes`) rather than
thousands of small files, which would each take a whole disk block. Packing is lossy: `quality`
trades size for fidelity, and `gharial data pack` reports both.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch

from gharial.data.manifest import Utterance

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
    utterances: list[Utterance], out: Path, quality: float = DEFAULT_QUALITY, workers: int = 1
) -> Iterator[int]:
    """Encode every utterance (in `workers` processes: the Opus encoder is slow) and write them to
    the Parquet file `out` with their ids and transcripts. Yields each utterance's encoded size, in
    order, as it goes; the file is written once all are done."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        encoded = []
        for data in pool.imap(_encode_one, [(utt, quality) for utt in utterances], chunksize=4):
            encoded.append(data)
            yield len(data)
    write_parquet(out, [u.id for u in utterances], [u.transcript for u in utterances], encoded)


def write_parquet(out: Path, ids: list[str], texts: list[str], audio: list[bytes]) -> None:
    """The columns `id`, `text` and `audio` {bytes, path} of a Hugging Face audio dataset."""
    column = pa.StructArray.from_arrays(
        [pa.array(audio, pa.binary()), pa.array([f"{i}.opus" for i in ids])], names=["bytes", "path"]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts, "audio": column}), out, compression="none")


def _encode_one(job: tuple[Utterance, float]) -> bytes:
    utt, quality = job
    torch.set_num_threads(1)
    return encode_opus(utt.load_audio(SAMPLE_RATE), quality)
