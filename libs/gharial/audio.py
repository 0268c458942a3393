"""Audio I/O: read files into mono float32 at the model's sample rate, and raw PCM conversion."""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import torch
from torch import Tensor


def pcm16_to_float(data: bytes) -> Tensor:
    """Little-endian signed 16-bit PCM bytes (even length) → float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"S16LE audio must have an even number of bytes, got {len(data)}")
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0)


def float_to_pcm16(audio: Tensor) -> bytes:
    clipped = torch.clamp(audio * 32768.0, -32768, 32767).round().to(torch.int16)
    return clipped.numpy().astype("<i2").tobytes()


def resample(audio: Tensor, source_rate: int, target_rate: int, zero_crossings: int = 16) -> Tensor:
    """Band-limited resampling: each output sample is a Kaiser-windowed sinc interpolation of the
    input, with the cutoff at 95% of the lower Nyquist so downsampling does not alias.

    Polyphase: outputs n, n + up, n + 2·up, … share one filter phase and read input windows `down`
    samples apart, so each phase is one matrix-vector product over a strided view (up of them, not
    one per sample)."""
    if source_rate == target_rate:
        return audio
    up, down, reach, weights = _polyphase_filter(source_rate, target_rate, zero_crossings)
    x = torch.nn.functional.pad(audio.double(), (reach, reach + 1))
    n_out = len(audio) * up // down
    out = torch.empty(n_out, dtype=torch.float64)
    for first in range(min(up, n_out)):
        count = (n_out - first + up - 1) // up
        start = first * down // up + 1  # input window of output `first`, in padded coordinates
        phase = weights[(first * down) % up]
        windows = x[start : start + (count - 1) * down + len(phase)].unfold(0, len(phase), down)
        out[first::up] = windows @ phase
    return out.float()


@functools.lru_cache(maxsize=64)
def _polyphase_filter(
    source_rate: int, target_rate: int, zero_crossings: int
) -> tuple[int, int, int, Tensor]:
    """(up, down, reach, weights [up, taps]): output n uses phase (n·down) mod up, because its
    distance to input sample k depends only on that phase."""
    g = math.gcd(source_rate, target_rate)
    up, down = target_rate // g, source_rate // g
    cutoff = min(1.0, up / down) * 0.95  # fraction of the input Nyquist
    reach = math.ceil(zero_crossings / cutoff)  # input samples each side of an output sample
    offsets = torch.arange(-reach + 1, reach + 1, dtype=torch.int64)
    phase = torch.arange(up, dtype=torch.int64).unsqueeze(1)
    distance = (phase - offsets * up).double() / up  # in input samples
    window = torch.special.i0(8.6 * torch.sqrt(torch.clamp(1 - (distance * cutoff / zero_crossings) ** 2, 0)))
    weights = cutoff * torch.sinc(cutoff * distance) * window / torch.special.i0(torch.tensor(8.6))
    return up, down, reach, weights


def load_audio(path: str | Path | BinaryIO, sample_rate: int = 16000) -> Tensor:
    """A WAV/FLAC/OGG file (path or open binary file) as mono float32 at `sample_rate` (channels
    averaged, resampled if needed)."""
    try:
        data, rate = soundfile.read(
            path if isinstance(path, io.IOBase) else str(path), dtype="float32", always_2d=True
        )
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    mono = torch.from_numpy(data.mean(axis=1))
    return resample(mono, rate, sample_rate)
