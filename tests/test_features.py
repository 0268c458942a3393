"""Features: streaming over any cutting of the audio equals one offline call, bit for bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gharial.asr.config import FeatureConfig, load_model_config
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.audio import float_to_pcm16, pcm16_to_float, resample

FEATURES = load_model_config("base").features
EXTRACTOR = FeatureExtractor(FEATURES)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def stream_features(
    audio: torch.Tensor, cuts: list[int], extractor: FeatureExtractor = EXTRACTOR
) -> torch.Tensor:
    stream = extractor.stream()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(audio)), len(audio)]
    parts = [stream.accept(audio[a:b]) for a, b in itertools.pairwise(bounds)]
    return torch.cat([*parts, stream.flush()])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3 * 16000),
    cuts=st.lists(st.integers(0, 3 * 16000), max_size=12),
    seed=st.integers(0, 100),
)
def test_any_cutting_gives_offline_features(n: int, cuts: list[int], seed: int) -> None:
    audio = noise(n, seed)
    offline = EXTRACTOR(audio)
    assert offline.shape == (2 * math.ceil(n / 960), FEATURES.feature_dim)
    torch.testing.assert_close(stream_features(audio, cuts), offline, rtol=0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=8), seed=st.integers(0, 100))
def test_many_streams_frames_computed_together_equal_each_alone(sizes: list[int], seed: int) -> None:
    """What the CPU backend does each step: streams' buffered frames (of any lengths) computed as
    batches give each stream's own features."""
    streams = [EXTRACTOR.stream() for _ in sizes]
    buffered = [
        s.take_frames(noise(n, seed + i)) for i, (s, n) in enumerate(zip(streams, sizes, strict=True))
    ]
    kept = [b if b is not None else s.flush_frames() for s, b in zip(streams, buffered, strict=True)]
    assert all(b is not None for b in kept)
    together = EXTRACTOR.of_buffered_many([b for b in kept if b is not None])
    alone = [EXTRACTOR.of_buffered(b) for b in kept if b is not None]
    assert [t.shape for t in together] == [a.shape for a in alone]
    for t, a in zip(together, alone, strict=True):
        torch.testing.assert_close(t, a, rtol=0, atol=1e-5)


def test_first_frame_needs_no_lookahead() -> None:
    """Causal windows: the first 60 ms of audio yields its features at once, equal to offline."""
    audio = noise(5000)
    stream = EXTRACTOR.stream()
    first = stream.accept(audio[:960])
    assert first.shape == (2, FEATURES.feature_dim)
    torch.testing.assert_close(first, EXTRACTOR(audio)[:2], rtol=0, atol=1e-5)
    assert stream.accept(audio[960:1000]).shape[0] == 0  # a partial frame waits


def test_last_partial_frame_is_zero_padded_at_flush() -> None:
    audio = noise(960 * 3 + 17)
    stream = EXTRACTOR.stream()
    assert stream.accept(audio).shape[0] == 6
    tail = stream.flush()
    assert tail.shape[0] == 2
    torch.testing.assert_close(tail, EXTRACTOR(audio)[6:], rtol=0, atol=1e-5)
    assert stream.flush().shape[0] == 0


def test_empty_stream_gives_one_padded_frame_like_offline() -> None:
    stream = EXTRACTOR.stream()
    torch.testing.assert_close(stream.flush(), EXTRACTOR(torch.zeros(0)))


def test_mel_stats_normalise_to_zero_mean_unit_variance() -> None:
    audio = noise(16000 * 2) * torch.linspace(0.1, 2.0, 32000)
    stats = MelStats.from_log_mels(EXTRACTOR.raw_log_mels(audio))
    normalised = FeatureExtractor(FEATURES, stats)(audio).reshape(-1, FEATURES.n_mels)
    torch.testing.assert_close(normalised.mean(0), torch.zeros(FEATURES.n_mels), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        normalised.var(0, unbiased=False), torch.ones(FEATURES.n_mels), atol=1e-3, rtol=0
    )


def test_dither_changes_features_only_when_asked() -> None:
    audio = torch.zeros(1920)
    assert torch.equal(EXTRACTOR(audio), EXTRACTOR(audio))
    assert not torch.equal(EXTRACTOR(audio), EXTRACTOR(audio, dither=1e-5))


def test_testing_config_uses_20ms_windows() -> None:
    cfg = load_model_config("testing").features
    assert cfg.window_samples == 320
    assert FeatureExtractor(cfg)(noise(4000)).shape == (10, 240)


@pytest.mark.parametrize(
    ("mean", "var", "message"),
    [([0.0] * 80, [1.0] * 79, "80 means but 79 variances"), ([0.0] * 80, [0.0] * 80, "positive")],
)
def test_bad_mel_stats_are_rejected(mean: list[float], var: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MelStats(mean=mean, var=var)


def test_mel_stats_must_match_the_model() -> None:
    with pytest.raises(ValueError, match="mel stats have 40 bins but the model uses 80"):
        FeatureExtractor(FeatureConfig(), MelStats.identity(40))


def test_pcm16_round_trip_and_odd_length() -> None:
    audio = torch.tensor([0.0, 0.5, -0.5, -1.0, 0.999])
    torch.testing.assert_close(pcm16_to_float(float_to_pcm16(audio)), audio, atol=1 / 32768, rtol=0)
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")


@pytest.mark.parametrize("source_rate", [8000, 22050, 44100, 48000])
def test_resample_keeps_a_tone_and_removes_aliases(source_rate: int) -> None:
    t = torch.arange(source_rate) / source_rate
    tone = resample(torch.sin(2 * math.pi * 440 * t), source_rate, 16000)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    assert tone.shape == (16000,)
    assert (tone[400:-400] - expected[400:-400]).abs().max() < 1e-3
    if source_rate > 16000:  # a 10 kHz tone is above the new Nyquist frequency: it must vanish
        alias = resample(torch.sin(2 * math.pi * 10000 * t), source_rate, 16000)
        assert alias[400:-400].abs().max() < 0.01
