"""The card's arithmetic (ProgramExecutor): exact integer matvecs within the quantization error bound,
greedy decoding with GreedyDecoder's semantics, the float model's decisions wherever they are not near
ties, bit-identical results whatever else shares a batch, and resets that really start afresh."""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.executor import (
    CardState,
    ExecutionError,
    ProgramExecutor,
    _sigmoid,
    quantized_matvec,
    teacher_forced_decisions,
)
from gharial.accelerator.quantize import ACCUMULATOR_BITS, MAX_MATVEC_COLS, QUANT_MAX, quantize_rows
from gharial.asr.config import ModelConfig
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.model import RNNT
from gharial.asr.streaming import Recognizer
from gharial.audio import load_audio

from .conftest import SPEECH_DEV, VOCAB, emitting_model, tone_utterance, train_on_tones
from .test_overfit import TRANSCRIPTS as TONE_TRANSCRIPTS
from .test_program import checkpoint_of


def executor_of(model: RNNT, tokenizer_bytes: bytes) -> ProgramExecutor:
    return ProgramExecutor(compile_checkpoint(checkpoint_of(model, tokenizer_bytes)))


@dataclass
class Speech:
    model: RNNT  # emitting_model(acoustic_gain=400): says something on real speech
    executor: ProgramExecutor
    features: list[Tensor]  # [T, F] per utterance, T a multiple of 2


@pytest.fixture(scope="module")
def speech(
    tiny_config: ModelConfig, speech_dev_manifest: list[dict[str, Any]], tiny_tokenizer_bytes: bytes
) -> Speech:
    audio = [load_audio(SPEECH_DEV / entry["files"][0]["fname"]) for entry in speech_dev_manifest[:4]]
    raw = FeatureExtractor(tiny_config.features)
    extractor = FeatureExtractor(
        tiny_config.features, MelStats.from_log_mels(torch.cat([raw.raw_log_mels(a) for a in audio]))
    )
    model = emitting_model(acoustic_gain=400)
    return Speech(model, executor_of(model, tiny_tokenizer_bytes), [extractor(a) for a in audio[1:]])


def frames_of(features: Tensor) -> Tensor:
    """[T, F] → [T/2, 2, F]: one row per 60 ms frame."""
    return features.reshape(len(features) // 2, 2, -1)


def card_tokens(executor: ProgramExecutor, features: Tensor, max_symbols: int) -> list[list[int]]:
    """Tokens per frame of one stream decoded alone on the card."""
    state = executor.new_state(1)
    executor.reset(state, [0])
    return [executor.run_batch(state, [0], f[None], [max_symbols]).tokens[0] for f in frames_of(features)]


def cpu_tokens(model: RNNT, features: Tensor, max_symbols: int) -> list[list[int]]:
    """Tokens per frame of the CPU backend: Recognizer + GreedyDecoder on the float model."""
    tokens = Recognizer(model, GreedyDecoder(model, max_symbols)).transcribe(features)
    per_frame: list[list[int]] = [[] for _ in range(len(features) // 2)]
    for frame, group in groupby(tokens, key=lambda t: t.frame):
        per_frame[frame] = [t.id for t in group]
    return per_frame


# --- (a) matvec: exact integers, bounded quantization error -------------------------------------


def test_float64_products_of_int16_are_exact_integer_arithmetic() -> None:
    """The emulator sums int16 x int16 products in float64; exact, whatever the order, for every dot
    product the compiler allows (the extreme values included: every product is 32767² in the last)."""
    g = torch.Generator().manual_seed(0)
    for batch, cols, rows in [(1, 240, 256), (7, 2048, 64), (33, 640, 1280), (2, MAX_MATVEC_COLS, 3)]:
        x = torch.randint(-QUANT_MAX, QUANT_MAX + 1, (batch, cols), dtype=torch.int16, generator=g)
        w = torch.randint(-QUANT_MAX, QUANT_MAX + 1, (rows, cols), dtype=torch.int16, generator=g)
        x[-1], w[-1] = QUANT_MAX, QUANT_MAX
        exact = x.long() @ w.long().t()
        assert exact.abs().max() < 2 ** (ACCUMULATOR_BITS - 1)
        assert torch.equal((x.double() @ w.double().t()).long(), exact)


def test_quantize_rows() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.75], [32767.0, 0.5, -1.5]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int16 and scale.dtype == torch.float32
    assert scale.tolist() == [1.0, pytest.approx(2 / 32767), 1.0]  # a row of zeros gets scale 1
    assert q[0].tolist() == [0, 0, 0]
    assert q[1].tolist() == [16384, -32767, 12288]  # 16383.5 rounds half to even, 12287.6 to nearest
    assert q[2].tolist() == [32767, 0, -2]  # 0.5 and -1.5 round half to even


@pytest.mark.parametrize("cols", [16, 240, 1280])
def test_matvec_error_is_within_the_quantization_bound(cols: int) -> None:
    """y − ŷ = Σ x·d + e·w − e·d with |e| ≤ s_x/2 and |d| ≤ s_w/2 (the rounding errors of x and w)."""
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(8, cols, generator=g) * torch.logspace(-3, 2, 8)[:, None]  # streams of any range
    w = torch.randn(96, cols, generator=g) * torch.logspace(-2, 1, 96)[:, None]
    w[5] = 0  # a row of zeros
    q_w, s_w = quantize_rows(w)
    _, s_x = quantize_rows(x)
    y = (x.double() @ w.double().t()).float()
    y_card = quantized_matvec(x, q_w, s_w)
    bound = (
        s_w[None, :] / 2 * x.abs().sum(1, keepdim=True)
        + s_x[:, None] / 2 * w.abs().sum(1)[None, :]
        + cols * s_x[:, None] * s_w[None, :] / 4
    )
    assert ((y_card - y).abs() <= bound * 1.001 + 1e-6 * y.abs()).all()
    assert torch.equal(y_card[:, 5], torch.zeros(8))
    # and in practice far inside it: about 0.005% of the output's spread
    assert ((y_card - y).norm() / y.norm()).item() < 1e-4


def test_transcendentals_do_not_depend_on_position() -> None:
    """What batch invariance rests on: the same value gives the same bits wherever it sits in a tensor
    (torch.sigmoid does not: its scalar tail differs from its vector body in the last bit)."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 5
    for fn in (_sigmoid, torch.tanh):
        alone = torch.cat([fn(x[i : i + 1]) for i in range(len(x))])
        for offset, extra in [(0, 0), (1, 7), (13, 3), (40_000, 11)]:
            embedded = torch.randn(offset + len(x) + extra)
            embedded[offset : offset + len(x)] = x
            assert torch.equal(fn(embedded)[offset : offset + len(x)], alone)


# --- (b) greedy decoding: GreedyDecoder's semantics and the float model's decisions ------------


def scripted_model(tiny_config: ModelConfig) -> RNNT:
    """Every weight zero except a script with wide margins: the encoder's output is a constant that
    proposes token 3 strongly and token 4 less, and the prediction network remembers emitted tokens
    (one-hot embedding, half-open forget gate) and suppresses them. Greedy decoding emits 3, then 4,
    then blank for ever after."""
    model = RNNT(tiny_config).eval()
    hidden = tiny_config.predictor.hidden
    eye = torch.eye(VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.joint.enc_proj.bias[3], model.joint.enc_proj.bias[4] = 1.5, 1.0
        model.predictor.embed.weight[:, :VOCAB] = 3 * eye
        rnn = model.predictor.rnn  # gates i, f, g, o
        bias, weight = rnn.bias_ih_l0, rnn.weight_ih_l0
        assert isinstance(bias, Tensor) and isinstance(weight, Tensor)
        bias[:hidden] = bias[3 * hidden :] = 6
        weight[2 * hidden : 3 * hidden] = torch.eye(hidden)
        model.joint.pred_proj.weight[:VOCAB, :VOCAB] = -10 * eye
        model.joint.out.weight[:VOCAB, :VOCAB] = 4 * eye
        model.joint.out.bias[VOCAB] = 2
    return model


@pytest.mark.parametrize(("max_symbols", "expected"), [(30, [[3, 4], [], []]), (1, [[3], [4], []])])
def test_scripted_model_decodes_exactly_as_greedy_decoder(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes, max_symbols: int, expected: list[list[int]]
) -> None:
    model = scripted_model(tiny_config)
    features = torch.randn(2 * 5, tiny_config.features.feature_dim)
    expected = [*expected, [], []]
    assert cpu_tokens(model, features, max_symbols) == expected
    assert card_tokens(executor_of(model, tiny_tokenizer_bytes), features, max_symbols) == expected


def test_max_symbols_per_row(tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes) -> None:
    """A joint that never says blank emits exactly max_symbols tokens per frame, per stream; 0 is
    encoder mode; the evaluation counts are what ran."""
    model = RNNT(tiny_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.joint.out.bias[7] = 5.0
    features = torch.randn(4, 2, 2, tiny_config.features.feature_dim)
    executor = executor_of(model, tiny_tokenizer_bytes)
    state = executor.new_state(6)
    executor.reset(state, [5, 0, 2, 3])
    for frame in range(2):
        out = executor.run_batch(state, [5, 0, 2, 3], features[:, frame], [1, 2, 5, 0])
        assert out.tokens == [[7], [7, 7], [7] * 5, []]
        assert (out.joint_evals, out.predictor_evals) == (8, 8)
        assert out.encoder_output.shape == (4, tiny_config.joint.hidden)
    for m in (1, 2, 5):
        assert cpu_tokens(model, features[0].flatten(0, 1), m) == [[7] * m] * 2


def test_blank_only_costs_one_joint_per_stream(tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes) -> None:
    model = RNNT(tiny_config).eval()
    with torch.no_grad():
        model.joint.out.bias[VOCAB] = 100.0  # blank wins everything
    executor = executor_of(model, tiny_tokenizer_bytes)
    state = executor.new_state(3)
    executor.reset(state, [0, 1, 2])
    out = executor.run_batch(
        state, [0, 1, 2], torch.randn(3, 2, tiny_config.features.feature_dim), [30, 1, 0]
    )
    assert out.tokens == [[], [], []]
    assert (out.joint_evals, out.predictor_evals) == (2, 0)


def test_trained_model_decodes_as_the_cpu_backend(
    tiny_config: ModelConfig, tiny_tokenizer_bytes: bytes
) -> None:
    """A trained model has clear decisions, and the card takes every clear one as the CPU backend
    does, on utterances it learned and on new ones. Teacher-forced, so that one near tie (int16
    against float can tip those, and which ones tip depends on the CPU's float rounding) does not
    change everything after it; whole transcripts then agree on all but at most one utterance."""
    model, extractor, _ = train_on_tones(tiny_config, TONE_TRANSCRIPTS, steps=500)
    executor = executor_of(model, tiny_tokenizer_bytes)
    rng = random.Random(0)
    utterances = TONE_TRANSCRIPTS + [[rng.randrange(10) for _ in range(rng.randint(2, 8))] for _ in range(10)]
    features = [extractor(tone_utterance(transcript)) for transcript in utterances]
    decisions = teacher_forced_decisions(model, executor, features)
    clear = [d for d in decisions if d.margin > 1.0]
    assert len(clear) >= 0.8 * len(decisions), "a trained model decides clearly"
    assert all(d.agrees for d in clear)
    expected = [cpu_tokens(model, f, 30) for f in features]
    same = sum(card_tokens(executor, f, 30) == e for f, e in zip(features, expected, strict=True))
    assert same >= len(utterances) - 1
    assert sum(len(tokens) for e in expected for tokens in e) >= 40


def test_decisions_agree_with_the_float_model_on_real_speech(speech: Speech) -> None:
    """Teacher-forced (the float model's tokens drive both), every decision of the float model's greedy
    decoding that is not a near tie is the card's too. The test model's margins are often small (it
    is hand-set, not trained), so a few near ties go the other way; comparing whole transcripts would
    let each of those change everything after it."""
    decisions = teacher_forced_decisions(speech.model, speech.executor, speech.features)
    assert len(decisions) > 150
    assert sum(d.agrees for d in decisions) / len(decisions) > 0.9
    assert all(d.agrees for d in decisions if d.margin > 1.0)


# --- (c) batch invariance, (d) resets, (e) encoder mode -----------------------------------------


def test_the_test_model_talks(speech: Speech) -> None:
    """The batch-invariance property below means something only if the card emits on this speech."""
    for features in speech.features:
        assert sum(map(len, card_tokens(speech.executor, features, 30))) >= 5


@dataclass
class Clip:
    features: Tensor  # [frames, 2, F]
    max_symbols: int


@st.composite
def clips(draw: st.DrawFn, speech: Speech) -> list[Clip]:
    out = []
    for k in range(draw(st.integers(1, 4))):
        frames = frames_of(speech.features[k % len(speech.features)])
        start = draw(st.integers(0, 30))
        length = draw(st.integers(1, 6))
        out.append(Clip(frames[start : start + length], draw(st.sampled_from([0, 1, 2, 30]))))
    return out


def run_alone(executor: ProgramExecutor, clip: Clip) -> list[tuple[list[int], Tensor]]:
    state = executor.new_state(1)
    executor.reset(state, [0])
    results = []
    for frame in clip.features:
        out = executor.run_batch(state, [0], frame[None], [clip.max_symbols])
        results.append((out.tokens[0], out.encoder_output[0]))
    return results


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streams_in_any_batches_get_the_same_bits_as_alone(speech: Speech, data: st.DataObject) -> None:
    streams = data.draw(clips(speech))
    executor = speech.executor
    capacity = 6
    rows = data.draw(st.permutations(range(capacity)))[: len(streams)]
    alone = [run_alone(executor, s) for s in streams]
    state = executor.new_state(capacity)
    executor.reset(state, rows)
    done = [0] * len(streams)
    while unfinished := [i for i, s in enumerate(streams) if done[i] < len(s.features)]:
        batch = data.draw(st.lists(st.sampled_from(unfinished), min_size=1, unique=True))
        out = executor.run_batch(
            state,
            [rows[i] for i in batch],
            torch.stack([streams[i].features[done[i]] for i in batch]),
            [streams[i].max_symbols for i in batch],
        )
        for b, i in enumerate(batch):
            expected_tokens, expected_enc = alone[i][done[i]]
            assert out.tokens[b] == expected_tokens
            assert torch.equal(out.encoder_output[b], expected_enc)
            done[i] += 1


def test_reset_returns_a_stream_to_its_start(speech: Speech) -> None:
    executor = speech.executor
    frames = frames_of(speech.features[0])
    fresh, used = executor.new_state(2), executor.new_state(2)
    executor.reset(fresh, [0, 1])
    executor.reset(used, [0, 1])
    for frame in frames[:10]:
        executor.run_batch(used, [0, 1], torch.stack([frame, frame]), [30, 30])
    other = {name: slot[0].clone() for name, slot in used.slots.items()}
    executor.reset(used, [1])
    for name in used.slots:
        assert torch.equal(used.slots[name][1], fresh.slots[name][1]), name
        assert torch.equal(used.slots[name][0], other[name]), f"{name}: another stream's state changed"
    a = executor.run_batch(used, [1], frames[3][None], [30])
    b = executor.run_batch(fresh, [1], frames[3][None], [30])
    assert a.tokens == b.tokens and torch.equal(a.encoder_output, b.encoder_output)


def test_encoder_mode_matches_the_float_encoder(speech: Speech) -> None:
    model, executor = speech.model, speech.executor
    for features in speech.features:
        with torch.no_grad():
            encoded, _ = model.encoder(features[None])
            expected = model.joint.enc_proj(encoded[0])
        state = executor.new_state(1)
        executor.reset(state, [0])
        for t, frame in enumerate(frames_of(features)):
            out = executor.run_batch(state, [0], frame[None], [0])
            assert out.tokens == [[]] and out.joint_evals == 0
            error = (out.encoder_output[0] - expected[t]).abs().max()
            assert error <= 0.02 * expected[t].abs().max(), f"frame {t}"


# --- requests the card refuses ------------------------------------------------------------------


def test_bad_requests(speech: Speech, tiny_config: ModelConfig) -> None:
    executor = speech.executor
    state = executor.new_state(2)
    good = torch.zeros(1, 2, tiny_config.features.feature_dim)
    with pytest.raises(ExecutionError, match=r"rows must be distinct and in \[0, 2\), got \[2\]"):
        executor.run_batch(state, [2], good, [1])
    with pytest.raises(ExecutionError, match="rows must be distinct"):
        executor.reset(state, [1, 1])
    with pytest.raises(ExecutionError, match=r"1 rows need features \[1, 2, 120\]"):
        executor.run_batch(state, [0], torch.zeros(1, 3, 120), [1])
    with pytest.raises(ExecutionError, match="max_symbols must be >= 0"):
        executor.run_batch(state, [0], good, [-1])
    with pytest.raises(ExecutionError, match="at least one stream"):
        CardState(executor.layout, 0)
