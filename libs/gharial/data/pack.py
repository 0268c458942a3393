"""Packing a corpus small: every utterance re-encoded as Ogg Opus, with a manifest beside it.

A lent GPU machine takes a working tree of at most 64 MiB, and nothing can be fetched from there; the
training audio (FLAC/WAV, ~30 kB per second) does not fit. Opus at about 16 kbit/s (2 kB per second)
keeps what the 80-mel front end sees of speech, so a whole training corpus travels. Packing is lossy:
`quality` trades size for fidelity, and `gharial data pack` reports both.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
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
    utterances: Iterable[Utterance], out_dir: Path, quality: float = DEFAULT_QUALITY
) -> tuple[int, int]:
    """Write `out_dir/audio/<id>.opus` for each utterance and `out_dir/manifest.json` (transcripts,
    durations and speakers kept). Returns (utterances, bytes of audio written)."""
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    packed, total = [], 0
    for utt in utterances:
        data = encode_opus(utt.load_audio(SAMPLE_RATE), quality)
        path = audio_dir / f"{utt.id}.opus"
        path.write_bytes(data)
        total += len(data)
        packed.append(
            Utterance(
                id=utt.id,
                audio=path,
                transcript=utt.transcript,
                duration=utt.duration,
                speaker=utt.speaker,
                sample_rate=SAMPLE_RATE,
            )
        )
    write_json_manifest(out_dir / "manifest.json", packed, SAMPLE_RATE)
    return len(packed), total
