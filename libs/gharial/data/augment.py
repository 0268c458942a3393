"""Audio and feature augmentations, each a small pure function of its input and a random generator.

Training (`gharial.training.batch`) and the synthetic corpus builder (`gharial.data.synth`) both
use them; the random generators are passed in, so a given seed always gives the same audio.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor

from gharial.audio import resample

SAMPLE_RATE = 16000


def change_speed(audio: Tensor, factor: float, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Play `factor` times faster (pitch and formants move with it): speed perturbation, and the
    vocal-tract-length change the synthetic corpus uses to make new speakers."""
    return resample(audio, round(sample_rate * factor), sample_rate)


def narrowband(audio: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """A telephone channel: down to 8 kHz and back, same length."""
    return resample(resample(audio, sample_rate, 8000), 8000, sample_rate)[: len(audio)]


def mix_at_snr(speech: Tensor, noise: Tensor, snr_db: float) -> Tensor:
    """speech + noise scaled to `snr_db`; the noise is repeated to cover the speech if shorter."""
    if len(noise) == 0 or len(speech) == 0:
        return speech
    noise = noise.repeat(math.ceil(len(speech) / len(noise)))[: len(speech)]
    speech_power = speech.pow(2).mean()
    noise_power = noise.pow(2).mean()
    if noise_power == 0:
        return speech
    gain = torch.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
    return speech + gain * noise


def coloured_noise(n: int, rng: random.Random) -> Tensor:
    """Gaussian noise with a random spectral tilt: white (0) through pink (0.5) to brown (1)."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    spectrum = np.fft.rfft(np_rng.standard_normal(max(n, 2)))
    spectrum /= np.maximum(np.arange(len(spectrum)), 1) ** rng.uniform(0.0, 1.0)
    return torch.from_numpy(np.fft.irfft(spectrum, n=max(n, 2))[:n]).float()


def room_reverb(audio: Tensor, rt60: float, rng: random.Random, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Convolve with a simulated room: a direct path, sparse early reflections within 40 ms and a
    diffuse tail decaying 60 dB in `rt60` seconds. The peak level is kept."""
    length = max(int(sample_rate * rt60), 2)
    t = np.arange(length) / sample_rate
    np_rng = np.random.default_rng(rng.getrandbits(32))
    rir = np_rng.standard_normal(length) * np.exp(-6.9 * t / rt60) * 0.3
    gap = int(0.003 * sample_rate)
    rir[1:gap] = 0.0
    rir[0] = 1.0
    for _ in range(6):
        rir[rng.randrange(gap, int(0.04 * sample_rate))] += rng.uniform(-0.6, 0.6)
    size = len(audio) + length - 1
    out = np.fft.irfft(np.fft.rfft(audio.numpy(), size) * np.fft.rfft(rir, size), size)[: len(audio)]
    peak = float(audio.abs().max()) if len(audio) else 0.0
    return torch.from_numpy(out / (np.abs(out).max() + 1e-9) * peak).float()


def snr_range(
    step: int, initial: tuple[float, float], final: tuple[float, float], delay: int, ramp: int
) -> tuple[float, float]:
    """The noise schedule: the initial (low, high) SNR range for `delay` steps, then a linear ramp
    over `ramp` steps to the final range (0–30 dB background, 15–30 dB babble)."""
    progress = 0.0 if step < delay else 1.0 if ramp == 0 else min(1.0, (step - delay) / ramp)
    return (
        initial[0] + (final[0] - initial[0]) * progress,
        initial[1] + (final[1] - initial[1]) * progress,
    )


def spec_augment(
    features: Tensor,
    n_mels: int,
    freq_masks: int,
    max_freq: int,
    time_masks: int,
    max_time: float,
    rng: random.Random,
) -> Tensor:
    """SpecAugment on stacked features [T, stack·n_mels]: `freq_masks` bands of up to `max_freq` mel
    bins (the same bins in every stacked frame) and `time_masks` spans of up to `max_time`·T frames
    set to zero, the normalised mean."""
    out = features.clone()
    t = out.shape[0]
    mels = out.view(t, -1, n_mels)
    for _ in range(freq_masks):
        width = rng.randint(0, max_freq)
        start = rng.randint(0, max(n_mels - width, 0))
        mels[:, :, start : start + width] = 0.0
    widest = int(max_time * t)
    for _ in range(time_masks):
        width = rng.randint(0, widest)
        start = rng.randint(0, max(t - width, 0))
        out[start : start + width] = 0.0
    return out
