"""Log-mel features (DESIGN §2), offline and streaming, with identical numbers.

Pipeline: pre-emphasis → 25 ms Hann windows every 10 ms → |rfft|² → 80 mel bins → log →
normalise with the training set's per-mel mean/variance (mel stats) → stack 3 frames and keep
every third → one 240-dim feature per 30 ms; two features per 60 ms frame.

Windows are *causal*: mel frame i covers the samples that end at (i+1)·hop, with zeros before
the start of the stream. Every 60 ms of audio therefore completes exactly six mel frames
without waiting for the next chunk, so streaming over 60 ms chunks needs only the last
(window − hop) samples as state and gives the same numbers as one offline call. Offline input
is zero-padded to a whole number of 60 ms frames, exactly as the streaming path pads at EOS.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor

from gharial.asr.config import FRAME_MS, FeatureConfig
from gharial.asr.level import AutoGainConfig, LevelTracker

LOG_FLOOR = 1e-10  # power floor before the log, so silence gives a finite feature


class MelStats(BaseModel):
    """Per-mel-bin mean and variance of log-mel features over the training data."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean: list[float]
    var: list[float]

    @model_validator(mode="after")
    def _check(self) -> MelStats:
        if len(self.mean) != len(self.var):
            raise ValueError(f"mel stats: {len(self.mean)} means but {len(self.var)} variances")
        if any(not v > 0 or math.isinf(v) for v in self.var):
            raise ValueError("mel stats: every variance must be positive and finite")
        return self

    @staticmethod
    def identity(n_mels: int) -> MelStats:
        """No normalisation (mean 0, variance 1): for models trained before stats exist."""
        return MelStats(mean=[0.0] * n_mels, var=[1.0] * n_mels)

    @staticmethod
    def from_log_mels(log_mels: Tensor) -> MelStats:
        """Stats of [N, n_mels] un-normalised log-mel frames."""
        var = log_mels.double().var(0, unbiased=False).clamp_min(1e-8)
        return MelStats(mean=log_mels.double().mean(0).tolist(), var=var.tolist())


def mel_filterbank(cfg: FeatureConfig) -> Tensor:
    """[n_fft/2 + 1, n_mels] triangular filters, equally spaced on the HTK mel scale, area-normalised."""

    def hz_to_mel(hz: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: Tensor) -> Tensor:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    nyquist = cfg.sample_rate / 2
    edges = mel_to_hz(
        torch.linspace(0.0, float(hz_to_mel(torch.tensor(nyquist))), cfg.n_mels + 2, dtype=torch.float64)
    )
    bins = torch.linspace(0.0, nyquist, cfg.n_fft // 2 + 1, dtype=torch.float64).unsqueeze(1)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (triangles * (2.0 / (upper - lower))).float()


class FeatureExtractor:
    """Turns 16 kHz float audio in [-1, 1] into normalised, stacked features [T, stack·n_mels].

    With `auto_gain` (inference only), each stream's quiet speech is first lifted to the training
    level (`gharial.asr.level`), offline and streaming alike."""

    def __init__(
        self, cfg: FeatureConfig, stats: MelStats | None = None, auto_gain: AutoGainConfig | None = None
    ) -> None:
        if stats is not None and len(stats.mean) != cfg.n_mels:
            raise ValueError(f"mel stats have {len(stats.mean)} bins but the model uses {cfg.n_mels}")
        stats = stats or MelStats.identity(cfg.n_mels)
        self.cfg = cfg
        self.auto_gain = auto_gain
        self.samples_per_frame = cfg.sample_rate * FRAME_MS // 1000
        self.history = cfg.window_samples - cfg.hop_samples
        self.window = torch.hann_window(cfg.window_samples, periodic=False)
        self.filterbank = mel_filterbank(cfg)
        self.mean = torch.tensor(stats.mean, dtype=torch.float32)
        self.inv_std = torch.tensor(stats.var, dtype=torch.float64).rsqrt().float()

    def log_mels(self, emphasised: Tensor) -> Tensor:
        """Un-normalised log-mels [..., frames, n_mels] of pre-emphasised samples [..., N] whose
        first (window − hop) samples are history from before the frames being computed."""
        frames = emphasised.unfold(-1, self.cfg.window_samples, self.cfg.hop_samples) * self.window
        power = torch.fft.rfft(frames, n=self.cfg.n_fft).abs().square()
        return torch.log(torch.clamp(power @ self.filterbank, min=LOG_FLOOR))

    def normalise_and_stack(self, log_mels: Tensor) -> Tensor:
        """[..., frames, n_mels] → [..., frames / stack, stack · n_mels]."""
        normalised = (log_mels - self.mean) * self.inv_std
        return normalised.reshape(*log_mels.shape[:-2], -1, self.cfg.stack * self.cfg.n_mels)

    def of_buffered(self, buffered: Tensor) -> Tensor:
        """Features [2·k, F] of samples buffered by `StreamingFeatures.take_frames` (k frames)."""
        return self.normalise_and_stack(self.log_mels(buffered))

    def of_buffered_many(self, buffered: list[Tensor]) -> list[Tensor]:
        """`of_buffered` of many streams' buffers: each length's buffers as one batch, which costs
        a fraction of computing them one by one (the per-operation overhead is paid once)."""
        by_length: dict[int, list[int]] = {}
        for i, samples in enumerate(buffered):
            by_length.setdefault(len(samples), []).append(i)
        features: dict[int, Tensor] = {}
        for rows in by_length.values():
            batch = self.of_buffered(torch.stack([buffered[i] for i in rows]))
            features.update(zip(rows, batch, strict=True))
        return [features[i] for i in range(len(buffered))]

    def pad_to_frames(self, audio: Tensor) -> Tensor:
        """Zero-pad to a whole number of 60 ms frames (at least one)."""
        n = audio.shape[-1]
        frames = max(1, -(-n // self.samples_per_frame))
        return torch.nn.functional.pad(audio, (0, frames * self.samples_per_frame - n))

    def level_tracker(self) -> LevelTracker | None:
        """A new stream's level tracker; None without auto gain."""
        return LevelTracker(self.auto_gain) if self.auto_gain is not None else None

    def apply_gain(self, tracker: LevelTracker | None, audio: Tensor) -> Tensor:
        """Whole 60 ms frames of a stream's audio, with the tracker's gains (if any) applied."""
        if tracker is None:
            return audio
        frames = audio.reshape(-1, self.samples_per_frame)
        return tracker.apply(frames, self.cfg.hop_samples).reshape(-1)

    def raw_log_mels(self, audio: Tensor, dither: float = 0.0) -> Tensor:
        """Un-normalised log-mels of a whole utterance (used to collect mel stats)."""
        audio = self.apply_gain(self.level_tracker(), self.pad_to_frames(audio.float()))
        if dither:
            audio = audio + dither * torch.randn_like(audio)
        emphasised = preemphasise(audio, self.cfg.preemphasis, previous=0.0)
        return self.log_mels(torch.nn.functional.pad(emphasised, (self.history, 0)))

    def __call__(self, audio: Tensor, dither: float = 0.0) -> Tensor:
        """Offline features of a whole utterance: [2·frames, F] where frames = ceil(len / 960)."""
        return self.normalise_and_stack(self.raw_log_mels(audio, dither))

    def stream(self) -> StreamingFeatures:
        return StreamingFeatures(self)


def preemphasise(audio: Tensor, coefficient: float, previous: float) -> Tensor:
    """y[n] = x[n] − a·x[n−1], where x[−1] = `previous` (the last sample of the previous chunk)."""
    shifted = torch.cat([audio.new_tensor([previous]), audio[:-1]])
    return audio - coefficient * shifted


class StreamingFeatures:
    """Per-stream feature state: accepts audio of any length, emits features per whole 60 ms frame.

    State is the tail of the un-emphasised input (for pre-emphasis), the last (window − hop)
    emphasised samples (for the overlapping windows), any samples short of a whole frame and,
    with auto gain, the stream's level tracker.
    """

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor
        self.pending = torch.zeros(0)
        self.previous_sample = 0.0
        self.history = torch.zeros(extractor.history)
        self.frames_emitted = 0
        self.level = extractor.level_tracker()

    def accept(self, audio: Tensor) -> Tensor:
        """Add samples; return features [2·k, F] for the k frames they complete (k may be 0)."""
        return self._features(self.take_frames(audio))

    def flush(self) -> Tensor:
        """End of stream: zero-pad the leftover samples to a whole frame and return its features.
        A stream that never produced a frame gets one frame of padding, as offline does."""
        return self._features(self.flush_frames())

    def _features(self, buffered: Tensor | None) -> Tensor:
        if buffered is None:
            return torch.zeros(0, self.extractor.cfg.feature_dim)
        return self.extractor.of_buffered(buffered)

    def take_frames(self, audio: Tensor) -> Tensor | None:
        """`accept` without computing the features: the stream's state moves on and the samples
        their computation needs come back (`FeatureExtractor.of_buffered`), None when the audio
        completes no frame. A server computes many streams' frames together this way."""
        self.pending = torch.cat([self.pending, audio.float()])
        n = self.extractor.samples_per_frame
        whole = self.pending.shape[0] // n * n
        if whole == 0:
            return None
        chunk, self.pending = self.pending[:whole], self.pending[whole:]
        chunk = self.extractor.apply_gain(self.level, chunk)
        emphasised = preemphasise(chunk, self.extractor.cfg.preemphasis, self.previous_sample)
        self.previous_sample = float(chunk[-1])
        buffered = torch.cat([self.history, emphasised])
        self.history = buffered[buffered.shape[0] - self.extractor.history :]
        self.frames_emitted += whole // n
        return buffered

    def flush_frames(self) -> Tensor | None:
        """`flush` without computing the features (see `take_frames`)."""
        leftover = self.pending.shape[0]
        if leftover == 0 and self.frames_emitted > 0:
            return None
        return self.take_frames(torch.zeros(self.extractor.samples_per_frame - leftover))
