"""Streaming == offline: any cutting of real speech into chunks, any batch composition, greedy or beam,
with or without state resets, gives the same features, tokens and final transcript as one offline call."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gharial.asr.config import ModelConfig
from gharial.asr.decoding.base import Decoder, Token
from gharial.asr.decoding.beam import BeamConfig, BeamDecoder
from gharial.asr.decoding.greedy import GreedyDecoder
from gharial.asr.features import FeatureExtractor, MelStats, StreamingFeatures
from gharial.asr.model import RNNT
from gharial.asr.pipeline import tokens_to_text
from gharial.asr.streaming import Recognizer, Stream, StreamingConfig
from gharial.asr.tokenizer import Tokenizer
from gharial.audio import load_audio

from .conftest import SPEECH_DEV, emitting_model

SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass
class Setup:
    model: RNNT
    extractor: FeatureExtractor
    utterances: list[torch.Tensor]
    tokenizer: Tokenizer


@pytest.fixture(scope="module")
def setup(
    tiny_config: ModelConfig, speech_dev_manifest: list[dict[str, Any]], tiny_tokenizer_bytes: bytes
) -> Setup:
    utterances = [load_audio(SPEECH_DEV / entry["files"][0]["fname"]) for entry in speech_dev_manifest[:4]]
    raw = FeatureExtractor(tiny_config.features)
    stats = MelStats.from_log_mels(torch.cat([raw.raw_log_mels(u) for u in utterances]))
    model = emitting_model(acoustic_gain=400)
    return Setup(
        model,
        FeatureExtractor(tiny_config.features, stats),
        utterances[1:],  # the first only calibrates the mel stats: the test model says little on it
        Tokenizer.from_bytes(tiny_tokenizer_bytes),
    )


def make_decoder(kind: str, model: RNNT) -> Decoder[Any]:
    return GreedyDecoder(model) if kind == "greedy" else BeamDecoder(model, BeamConfig(width=3))


class LiveStream:
    """A client's view: audio arrives in arbitrary pieces; features and results come out per 60 ms."""

    def __init__(
        self, recognizer: Recognizer[Any], extractor: FeatureExtractor, audio: torch.Tensor, cuts: list[int]
    ):
        self.stream: Stream[Any] = recognizer.new_stream()
        self.features: StreamingFeatures = extractor.stream()
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(audio)), len(audio)]
        self.pieces = [audio[a:b] for a, b in itertools.pairwise(bounds)]
        self.pending: list[torch.Tensor] = []
        self.all_features: list[torch.Tensor] = []
        self.finals: list[Token] = []

    def next_frame(self) -> torch.Tensor | None:
        """Features [2, F] of the next complete frame, feeding more audio as needed; None at the end."""
        while not self.pending and (self.pieces or self.features is not None):
            if self.pieces:
                produced = self.features.accept(self.pieces.pop(0))
            else:
                produced, self.features = self.features.flush(), None  # type: ignore[assignment]
            self.all_features.append(produced)
            self.pending += list(produced.split(2)) if len(produced) else []
        return self.pending.pop(0) if self.pending else None


def run_live(recognizer: Recognizer[Any], streams: list[LiveStream]) -> None:
    """Step all live streams together, one batched call per 60 ms; finished streams leave the batch."""
    active = list(streams)
    while active:
        frames = [(s, s.next_frame()) for s in active]
        done = [s for s, f in frames if f is None]
        for s in done:
            s.finals += recognizer.finish(s.stream)
        batch = [(s, f) for s, f in frames if f is not None]
        if batch:
            results = recognizer.step(torch.stack([f for _, f in batch]), [s.stream for s, _ in batch])
            for (s, _), result in zip(batch, results, strict=True):
                s.finals += result.final or []
        active = [s for s, _ in batch]


def test_the_test_model_talks(setup: Setup) -> None:
    """The equality tests below mean something only if the model emits tokens on this speech."""
    greedy = Recognizer(setup.model, make_decoder("greedy", setup.model))
    beam = Recognizer(setup.model, make_decoder("beam", setup.model))
    assert all(len(greedy.transcribe(setup.extractor(u))) >= 5 for u in setup.utterances)
    assert any(beam.transcribe(setup.extractor(u)) for u in setup.utterances)


cut_lists = st.lists(st.integers(1, 80_000), max_size=10)


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@SETTINGS
@given(cuts=cut_lists, which=st.integers(0, 2))
def test_one_stream_any_cutting_equals_offline(setup: Setup, kind: str, cuts: list[int], which: int) -> None:
    recognizer = Recognizer(setup.model, make_decoder(kind, setup.model))
    audio = setup.utterances[which]
    offline_features = setup.extractor(audio)
    offline = recognizer.transcribe(offline_features)
    live = LiveStream(recognizer, setup.extractor, audio, cuts)
    run_live(recognizer, [live])
    torch.testing.assert_close(torch.cat(live.all_features), offline_features, rtol=0, atol=1e-5)
    assert [t.id for t in live.finals] == [t.id for t in offline]
    assert live.finals == offline  # same frames too
    assert tokens_to_text(setup.tokenizer, live.finals) == tokens_to_text(setup.tokenizer, offline)


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@SETTINGS
@given(cuts=st.lists(cut_lists, min_size=3, max_size=3), order=st.permutations(range(3)))
def test_mixed_length_batch_equals_each_offline(
    setup: Setup, kind: str, cuts: list[list[int]], order: list[int]
) -> None:
    recognizer = Recognizer(setup.model, make_decoder(kind, setup.model))
    audios = [setup.utterances[i] for i in order]
    lives = [LiveStream(recognizer, setup.extractor, a, c) for a, c in zip(audios, cuts, strict=True)]
    run_live(recognizer, lives)
    for live, audio in zip(lives, audios, strict=True):
        assert live.finals == recognizer.transcribe(setup.extractor(audio))


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@SETTINGS
@given(starts=st.lists(st.integers(0, 30), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_batch_order_and_membership_may_change_every_step(
    setup: Setup, kind: str, starts: list[int], seed: int
) -> None:
    """As on a server: streams join late, and each step batches them in a new order (the batched
    states of the last step are then reused by gathering, not concatenation; BatchCache)."""
    recognizer = Recognizer(setup.model, make_decoder(kind, setup.model))
    features = [setup.extractor(u) for u in setup.utterances]
    streams = [recognizer.new_stream() for _ in features]
    finals: list[list[Token]] = [[] for _ in features]
    shuffle = torch.Generator().manual_seed(seed)
    for step in range(max(s + len(f) // 2 for s, f in zip(starts, features, strict=True))):
        live = [
            i for i, (s, f) in enumerate(zip(starts, features, strict=True)) if s <= step < s + len(f) // 2
        ]
        live = [live[k] for k in torch.randperm(len(live), generator=shuffle).tolist()]
        if not live:
            continue
        frames = torch.stack([features[i][2 * (step - starts[i]) : 2 * (step - starts[i]) + 2] for i in live])
        for i, result in zip(live, recognizer.step(frames, [streams[i] for i in live]), strict=True):
            finals[i] += result.final or []
    for i, f in enumerate(features):
        assert finals[i] + recognizer.finish(streams[i]) == recognizer.transcribe(f)


@pytest.mark.parametrize("kind", ["greedy", "beam"])
def test_state_resets_stream_equals_offline(setup: Setup, kind: str) -> None:
    config = StreamingConfig(sr_segment_s=0.9, sr_overlap_s=0.3)
    recognizer = Recognizer(setup.model, make_decoder(kind, setup.model), config)
    audio = torch.cat(setup.utterances)
    offline = recognizer.transcribe(setup.extractor(audio))
    live = LiveStream(recognizer, setup.extractor, audio, list(range(1000, len(audio), 3333)))
    run_live(recognizer, [live])
    assert live.finals == offline
    plain = Recognizer(setup.model, make_decoder(kind, setup.model)).transcribe(setup.extractor(audio))
    assert offline != plain, "resets must change the result of a long stream"


def test_state_resets_keep_old_tokens_in_the_overlap(setup: Setup) -> None:
    """Up to a reset the tokens are those of the unreset stream; after it, those of a fresh stream
    started `overlap` before the reset (its tokens inside the overlap dropped)."""
    segment, overlap = 15, 5  # frames
    config = StreamingConfig(
        sr_segment_s=segment * 0.06, sr_overlap_s=overlap * 0.06, endpoint_silence_ms=None
    )
    model = setup.model
    features = setup.extractor(setup.utterances[0])[: 2 * 2 * segment]  # two segments
    with_resets = Recognizer(model, GreedyDecoder(model), config).transcribe(features)
    plain = Recognizer(model, GreedyDecoder(model), StreamingConfig(endpoint_silence_ms=None))
    before = [t for t in plain.transcribe(features) if t.frame < segment]
    restart = 2 * (segment - overlap)
    after = [Token(t.id, t.frame + segment - overlap) for t in plain.transcribe(features[restart:])]
    assert with_resets == before + [t for t in after if t.frame >= segment]


def test_endpoints_finalise_during_the_stream(setup: Setup) -> None:
    recognizer = Recognizer(setup.model, GreedyDecoder(setup.model), StreamingConfig(endpoint_silence_ms=120))
    features = setup.extractor(setup.utterances[1])
    stream = recognizer.new_stream()
    results = [recognizer.step(features[i : i + 2][None], [stream])[0] for i in range(0, len(features), 2)]
    finals = [r for r in results if r.final is not None]
    assert len(finals) > 1, "silence between words should finalise results before the end"
    everything = [t for r in finals for t in r.final or []] + recognizer.finish(stream)
    assert everything == recognizer.transcribe(features)
    for result in results:  # a provisional tail never contains finalised tokens
        assert all(t.frame <= result.frame for t in result.provisional)


def test_eos_token_finalises_and_is_never_shown(tiny_config: ModelConfig) -> None:
    model = emitting_model()
    eos = 5
    with torch.no_grad():  # make the joint emit token 3, then EOS, with certainty
        model.joint.out.weight.zero_()
        model.joint.out.bias.fill_(-20.0)
        model.joint.out.bias[eos] = 10.0
    recognizer = Recognizer(model, GreedyDecoder(model, max_symbols=1), eos_token_id=eos)
    stream = recognizer.new_stream()
    (result,) = recognizer.step(torch.zeros(1, 2, tiny_config.features.feature_dim), [stream])
    assert result.final == [] and result.provisional == []
