"""Prepacked CPU inference (gharial.asr.prepacked): the same numbers as the plain modules, the same
tokens as the plain model on real speech, and only where it applies."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.config import load_model_config
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor
from gharial.asr.model import RNNT
from gharial.asr.pipeline import SpeechToText, bundled_checkpoint
from gharial.asr.prepacked import (
    HUGE_PAGE,
    PackedLinear,
    PackedLSTM,
    back_with_huge_pages,
    can_prepack,
    packing_pays,
    prepack_for_cpu,
)
from gharial.asr.streaming import Recognizer
from gharial.audio import load_audio

from .conftest import SPEECH_DEV, emitting_model, tone_utterance

pytestmark = pytest.mark.skipif(not can_prepack(), reason="torch built without oneDNN")


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(0, 9),
    steps=st.integers(1, 4),
    layers=st.integers(1, 3),
    inputs=st.sampled_from([3, 16, 40]),
    hidden=st.sampled_from([1, 8, 24]),
    seed=st.integers(0, 2**16),
)
@torch.inference_mode()
def test_packed_lstm_equals_nn_lstm(
    batch: int, steps: int, layers: int, inputs: int, hidden: int, seed: int
) -> None:
    torch.manual_seed(seed)
    lstm = nn.LSTM(inputs, hidden, layers, batch_first=True)
    x = torch.randn(batch, steps, inputs)
    state = (torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden))
    y, (h, c) = lstm(x, state)
    packed_y, (packed_h, packed_c) = PackedLSTM(lstm)(x, state)
    for ours, theirs in [(packed_y, y), (packed_h, h), (packed_c, c)]:
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_packed_linear_equals_nn_linear_any_leading_shape_and_no_bias() -> None:
    torch.manual_seed(0)
    for linear in (nn.Linear(24, 40), nn.Linear(24, 40, bias=False)):
        packed = PackedLinear(linear)
        for x in (torch.randn(5, 24), torch.randn(2, 3, 24), torch.randn(0, 24), torch.randn(7, 48)[:, ::2]):
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-6)


def test_packed_lstm_refuses_what_it_does_not_implement() -> None:
    for lstm in (
        nn.LSTM(4, 8, bidirectional=True, batch_first=True),
        nn.LSTM(4, 8, proj_size=2, batch_first=True),
        nn.LSTM(4, 8),
    ):
        with pytest.raises(ValueError, match="unidirectional batch-first"):
            PackedLSTM(lstm)


def test_prepack_swaps_every_lstm_and_linear_and_keeps_the_rest() -> None:
    model = prepack_for_cpu(emitting_model(), min_weights=0)
    kinds = {type(m) for m in model.modules()}
    assert nn.LSTM not in kinds and nn.Linear not in kinds
    assert {PackedLSTM, PackedLinear, nn.Embedding} <= kinds
    assert not model.training


def test_prepack_leaves_models_it_cannot_pack_alone() -> None:
    model = emitting_model().double()
    assert prepack_for_cpu(model) is model
    assert any(isinstance(m, nn.LSTM) for m in model.modules())


@torch.inference_mode()
def test_prepacked_model_streams_the_same_tokens_as_the_plain_one() -> None:
    """Batched streaming steps over five streams of different tone sequences: token for token the
    plain model's result."""
    plain = emitting_model(acoustic_gain=400.0)
    packed = prepack_for_cpu(copy.deepcopy(plain), min_weights=0)
    extractor = FeatureExtractor(plain.cfg.features)
    utterances = [extractor(tone_utterance([k, (3 * k) % 11, (5 * k + 2) % 13, k + 1])) for k in range(5)]
    frames = min(len(f) for f in utterances) // 2
    features = torch.stack([f[: 2 * frames].reshape(frames, 2, -1) for f in utterances], 1)[:60]

    def run(model: RNNT) -> list[list[int]]:
        recognizer = Recognizer(model, GreedyDecoder(model))
        streams = [recognizer.new_stream() for _ in utterances]
        tokens: list[list[int]] = [[] for _ in streams]
        for frame in features:
            for k, result in enumerate(recognizer.step(frame, streams)):
                tokens[k] += [t.id for t in result.final or []]
        return [t + [x.id for x in recognizer.finish(s)] for t, s in zip(tokens, streams, strict=True)]

    plain_tokens = run(plain)
    assert sum(map(len, plain_tokens)) > 50 and len({tuple(t) for t in plain_tokens}) > 1  # meaningful
    assert run(packed) == plain_tokens


def test_large_layers_are_always_packed_and_small_ones_where_the_trial_says() -> None:
    """`base` packs its LSTMs and the joint's output layer whatever the trial says; its small
    projections, and the bundled en-small (every layer below PACK_MIN_WEIGHTS), follow the trial."""
    base = prepack_for_cpu(RNNT(load_model_config("base")), pays=None)
    assert isinstance(base.encoder.pre_rnn, PackedLSTM) and isinstance(base.encoder.post_rnn, PackedLSTM)
    assert isinstance(base.joint.out, PackedLinear)  # 768 x 8704
    assert isinstance(base.joint.enc_proj, nn.Linear)  # 1024 x 768 = 0.8 M
    checkpoint = HardwareCheckpoint.load(bundled_checkpoint())
    never = prepack_for_cpu(checkpoint.build_model(), pays=lambda plain, packed: False)
    assert not any(isinstance(m, PackedLSTM | PackedLinear) for m in never.modules())
    tried: list[type] = []
    always = prepack_for_cpu(
        checkpoint.build_model(), pays=lambda plain, packed: tried.append(type(plain)) or True
    )
    assert not any(isinstance(m, nn.LSTM | nn.Linear) for m in always.modules())
    assert {nn.LSTM, nn.Linear} <= set(tried)


class Slowed(nn.Module):
    """A layer that sleeps before answering: far slower than any small product."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        time.sleep(0.003)
        return self.inner(*args)


class SlowLSTM(nn.LSTM):
    def forward(self, *args: Any) -> Any:  # type: ignore[override]
        time.sleep(0.003)
        return super().forward(*args)


def test_packing_pays_only_when_the_packed_layer_is_faster() -> None:
    linear, lstm = nn.Linear(64, 48), nn.LSTM(24, 32, num_layers=2, batch_first=True)
    assert not packing_pays(linear, Slowed(PackedLinear(linear)))
    assert not packing_pays(lstm, Slowed(PackedLSTM(lstm)))
    slow_lstm = SlowLSTM(24, 32, num_layers=2, batch_first=True)
    assert packing_pays(slow_lstm, PackedLSTM(slow_lstm))


def test_bundled_model_on_real_speech_same_transcript_prepacked_or_not() -> None:
    """The bundled model with every layer packed against the plain checkpoint model."""
    wavs = sorted((SPEECH_DEV / "audio").glob("*.wav"))[:3]
    if not wavs:
        pytest.skip(f"speech-dev data not found at {SPEECH_DEV}")
    checkpoint = HardwareCheckpoint.load(bundled_checkpoint())
    stt = SpeechToText(checkpoint)
    packed = prepack_for_cpu(checkpoint.build_model(), min_weights=0)
    assert any(isinstance(m, PackedLSTM) for m in packed.modules())
    packed_recognizer = Recognizer(packed, GreedyDecoder(packed))
    for wav in wavs:
        audio = load_audio(wav, checkpoint.meta.config.features.sample_rate)
        expected = stt.transcribe(audio).tokens
        assert expected
        assert [t.id for t in packed_recognizer.transcribe(stt.features(audio))] == expected


def test_huge_page_backing_is_best_effort_and_keeps_the_data() -> None:
    weights = torch.randn(3 * HUGE_PAGE // 4)
    before = weights.clone()
    assert back_with_huge_pages(weights.data_ptr(), 100) is False  # no whole 2 MiB page inside
    assert isinstance(back_with_huge_pages(weights.data_ptr(), weights.numel() * 4), bool)
    assert torch.equal(weights, before)
