"""Beam search against greedy decoding and against hand-built cases: width 1 must be greedy exactly,
batching must not matter, and the n-gram LM and keyword boosting must flip the decisions they
are meant to flip (and only those)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kenlm
import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from gharial.asr.config import load_model_config
from gharial.asr.decoding.base import Token
from gharial.asr.decoding.beam import BeamConfig, BeamDecoder, BeamState
from gharial.asr.decoding.greedy import GreedyDecoder, GreedyState
from gharial.asr.decoding.keywords import ROOT, KeywordBoost
from gharial.asr.decoding.lm import NgramLM
from gharial.asr.model import RNNT, LSTMState

from .conftest import emitting_model as toy_model

V = 31  # the tiny config's vocabulary; blank is 31
JOINT = 48
NO_PRUNING = {"token_prune": 1e9, "beam_prune": 1e9}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tensors are tiny: a thread pool only adds overhead, and on a busy machine its spinning
    threads made this module 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_frames(seed: int, streams: int, frames: int) -> Tensor:
    """Joint-projected encoder outputs [streams, frames, joint hidden]: each frame proposes a few tokens."""
    return torch.randn(streams, frames, JOINT, generator=torch.Generator().manual_seed(seed)) - 2


def decode(decoder: Any, enc: Tensor, lengths: list[int], states: list[Any] | None = None) -> list[Any]:
    """Run `decoder` over streams of different lengths, batching whichever streams have a frame."""
    states = states if states is not None else [decoder.initial_state() for _ in lengths]
    for t in range(max(lengths)):
        active = [b for b, n in enumerate(lengths) if t < n]
        decoder.advance(enc[active, t], [states[b] for b in active], [t] * len(active))
    return states


@torch.inference_mode()
def path_score(model: RNNT, enc: Tensor, tokens: list[Token], temperature: float, max_symbols: int) -> float:
    """Temperature-scaled log-probability of one alignment: `tokens` at their frames, then blank,
    except after `max_symbols` tokens in a frame (the decoder moves on without one)."""

    def feed(token: int, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
        out, state = model.predictor(torch.tensor([[token]]), state)
        return model.joint.pred_proj(out[0, 0]), state

    projected, state = feed(model.blank_id, None)
    score, i = 0.0, 0
    for t in range(enc.shape[0]):
        emitted = 0
        while emitted < max_symbols:
            lp = (model.joint.combine(enc[t], projected).double() / temperature).log_softmax(-1)
            if i == len(tokens) or tokens[i].frame != t:
                score += lp[model.blank_id].item()
                break
            score += lp[tokens[i].id].item()
            projected, state = feed(tokens[i].id, state)
            i, emitted = i + 1, emitted + 1
    assert i == len(tokens)
    return score


# ---------------------------------------------------------------- beam search on random models


@pytest.mark.parametrize("temperature", [1.4, 1.0])
@pytest.mark.parametrize("max_symbols", [None, 2])
@pytest.mark.parametrize("prune", [{}, NO_PRUNING])
def test_width_one_is_greedy(temperature: float, max_symbols: int | None, prune: dict[str, float]) -> None:
    lengths = [40, 25, 33, 9]
    for seed in range(3):
        model, enc = toy_model(seed), random_frames(seed, len(lengths), max(lengths))
        greedy: list[GreedyState] = decode(GreedyDecoder(model, max_symbols), enc, lengths)
        config = BeamConfig(width=1, temperature=temperature, max_symbols=max_symbols, **prune)
        beam = BeamDecoder(model, config)
        states: list[BeamState] = decode(beam, enc, lengths)
        assert any(len(g.tokens) > 5 for g in greedy)
        for b, (g, s) in enumerate(zip(greedy, states, strict=True)):
            assert beam.best(s) == g.tokens
            expected = path_score(model, enc[b, : lengths[b]], g.tokens, temperature, beam.max_symbols)
            assert beam.nbest(s, 1)[0][1] == pytest.approx(expected, abs=1e-4)


def test_max_symbols_caps_tokens_per_frame() -> None:
    model, enc = toy_model(0), random_frames(0, 3, 30)
    for state in decode(BeamDecoder(model, BeamConfig(max_symbols=2)), enc, [30, 30, 30]):
        for hyp in state.hyps:
            frames = [t.frame for t in hyp.tokens]
            assert all(frames.count(f) <= 2 for f in frames)


def test_batching_does_not_change_results() -> None:
    lengths = [30, 12, 26, 30]
    model, enc = toy_model(1), random_frames(1, len(lengths), max(lengths))
    beam = BeamDecoder(model, BeamConfig())
    together = decode(beam, enc, lengths)
    for b, n in enumerate(lengths):
        (alone,) = decode(beam, enc[b : b + 1], [n])
        assert [tokens for tokens, _ in beam.nbest(alone, 4)] == [t for t, _ in beam.nbest(together[b], 4)]
        assert [s for _, s in beam.nbest(alone, 4)] == pytest.approx(
            [s for _, s in beam.nbest(together[b], 4)]
        )


@pytest.mark.parametrize("seed", range(4))
def test_wider_beam_scores_at_least_greedy(seed: int) -> None:
    lengths = [40, 40]
    model, enc = toy_model(seed), random_frames(seed, len(lengths), max(lengths))
    config = BeamConfig()
    greedy: list[GreedyState] = decode(GreedyDecoder(model), enc, lengths)
    beam = BeamDecoder(model, config)
    for b, state in enumerate(decode(beam, enc, lengths)):
        greedy_score = path_score(model, enc[b], greedy[b].tokens, config.temperature, beam.max_symbols)
        assert beam.nbest(state, 1)[0][1] >= greedy_score - 1e-4
        for tokens, score in beam.nbest(state, 4):  # merged alignments only ever add probability
            assert score >= path_score(model, enc[b], tokens, config.temperature, beam.max_symbols) - 1e-4
        scores = [score for _, score in beam.nbest(state, 4)]
        assert scores == sorted(scores, reverse=True) and 1 < len(scores) <= 4


def test_skipping_hopeless_candidates_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = [30, 30, 20]
    model, enc = toy_model(3), random_frames(3, len(lengths), max(lengths))
    beam = BeamDecoder(model, BeamConfig(keyword_boost=1.5))
    keywords = [None, [[26, 2], [20, 28, 17]], [[5]]]

    def results() -> list[list[tuple[list[Token], float]]]:
        states = [beam.initial_state(keywords=k) for k in keywords]
        return [beam.nbest(s, 4) for s in decode(beam, enc, lengths, states)]

    fast = results()
    monkeypatch.setattr(BeamDecoder, "_hopeless_below", lambda self, pool: -math.inf)
    assert results() == fast


def common_prefix(sequences: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n and s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def test_provisional_and_commit() -> None:
    model, enc = toy_model(2), random_frames(2, 1, 60)
    beam = BeamDecoder(model, BeamConfig())
    state = beam.initial_state()
    committed: list[list[Token]] = []
    snapshots: list[list[Token]] = []
    saw_disagreement = False
    shown: list[Token] = []
    for t in range(60):
        beam.advance(enc[:, t], [state], [t])
        ids = [[tok.id for tok in tokens] for tokens, _ in beam.nbest(state, 4)]
        provisional = beam.provisional(state)
        assert provisional == beam.best(state)[: common_prefix(ids)]
        saw_disagreement |= len(provisional) < len(beam.best(state))
        assert provisional[: len(shown)] == shown  # provisional text never retracts
        shown = provisional
        if t % 15 == 14:
            best = beam.best(state)
            tokens = beam.commit(state)
            assert tokens == best
            assert len(state.hyps) == 1 and state.hyps[0].tokens == () and state.hyps[0].score == 0.0
            assert beam.best(state) == beam.provisional(state) == []
            assert tokens[: len(shown)] == shown
            shown = []
            committed.append(tokens)
            snapshots.append(list(tokens))
    assert saw_disagreement
    assert committed == snapshots  # nothing handed over was touched later
    frames = [tok.frame for tokens in committed for tok in tokens]
    assert frames == sorted(frames) and len(frames) > 10


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        BeamConfig(widht=3)  # type: ignore[call-arg]


# ---------------------------------------------------------------- hand-set models: LM and keywords


def scripted_model(frame_types: list[dict[int, float]], max_symbols: int = 1) -> RNNT:
    """A model whose logits ignore the prediction network: a frame of type j (encoder output one-hot
    at j, see `scripted_frames`) gives token k logit -10 + frame_types[j][k] and blank logit 0."""
    cfg = load_model_config("tiny").model_copy(update={"max_symbols_per_step": max_symbols})
    model = RNNT(cfg).eval()
    with torch.no_grad():
        model.joint.pred_proj.weight.zero_()
        model.joint.pred_proj.bias.zero_()
        model.joint.out.weight.zero_()
        model.joint.out.bias.fill_(-10)
        model.joint.out.bias[V] = 0
        for j, logits in enumerate(frame_types):
            for token, value in logits.items():
                model.joint.out.weight[token, j] = value
    return model


def scripted_frames(types: list[int]) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(types), JOINT).float().unsqueeze(0)


def run(beam: BeamDecoder, types: list[int], state: BeamState | None = None) -> BeamState:
    state = state if state is not None else beam.initial_state()
    return decode(beam, scripted_frames(types), [len(types)], [state])[0]


def ids(tokens: list[Token]) -> list[int]:
    return [t.id for t in tokens]


A, B, C, D = 3, 4, 5, 6


def test_keyword_wins_a_tie() -> None:
    model = scripted_model([{A: 15, B: 15}])
    beam = BeamDecoder(model, BeamConfig())
    assert ids(beam.best(run(beam, [0]))) == [A]  # exact tie: the lower token id
    state = beam.initial_state(keywords=[[B]])
    run(beam, [0], state)
    assert ids(beam.best(state)) == [B]
    assert ids(beam.commit(state)) == [B]


def test_keyword_prefix_is_refunded() -> None:
    model = scripted_model([{A: 15.5, B: 15}, {D: 15}, {C: 15}])  # A is a little more likely
    beam = BeamDecoder(model, BeamConfig())
    assert ids(beam.best(run(beam, [0]))) == [A]
    state = run(beam, [0], beam.initial_state(keywords=[[B, C]]))
    assert ids(beam.best(state)) == [B]  # boosted while the match may still complete
    assert ids(beam.commit(state)) == [A]  # but a hypothesis ending mid-keyword earns nothing

    state = run(beam, [0, 1], beam.initial_state(keywords=[[B, C]]))
    assert ids(beam.best(state)) == [A, D]  # the match broke: B's bonus was refunded
    state = run(beam, [0, 2], beam.initial_state(keywords=[[B, C]]))
    assert ids(beam.best(state)) == [B, C]


def test_keyword_trie() -> None:
    boost = KeywordBoost([[1, 2, 3], [4], [7, 8], [7, 8, 9]], boost=2.0)

    def total(tokens: list[int]) -> tuple[float, float]:
        state, score = boost.initial(), 0.0
        for token in tokens:
            state, delta = boost.advance(state, token)
            score += delta
        return score, boost.pending(state)

    assert total([1, 2, 3]) == (6.0, 0.0)
    assert total([1, 2]) == (4.0, 4.0)  # pending: refunded if the hypothesis ends here
    assert total([1, 2, 5]) == (0.0, 0.0)  # broken partial match: refunded
    assert total([1, 4]) == (2.0, 0.0)  # refund, then the token starts (and completes) [4] from the root
    assert total([1, 1, 2, 3]) == (6.0, 0.0)
    assert total([7, 8]) == (4.0, 0.0)  # complete, yet [7, 8, 9] may still follow
    assert total([7, 8, 9]) == (6.0, 0.0)
    assert total([7, 8, 5]) == (4.0, 0.0)  # the completed keyword keeps its bonus
    assert total([5, 6]) == (0.0, 0.0)
    assert boost.advance(ROOT, 5) == (ROOT, 0.0)
    with pytest.raises(ValueError):
        KeywordBoost([[1], []], 1.0)


ARPA = """\\data\\
ngram 1=6
ngram 2=2

\\1-grams:
-1.0\t</s>
-99\t<s>\t-0.5
-2.0\t<unk>
-1.0\tcat\t-0.3
-3.0\tcap\t-0.3
-1.0\tsat\t-0.3

\\2-grams:
-0.2\t<s> cat
-0.1\tcat sat

\\end\\
"""

PIECES = ["\u2581cap", "\u2581cat", "\u2581sat", "\u2581", "s", *(f"\u2581w{i}" for i in range(5, V))]
CAP, CAT, SAT = 0, 1, 2


@pytest.fixture
def arpa(tmp_path: Path) -> Path:
    path = tmp_path / "words.arpa"
    path.write_text(ARPA)
    return path


def test_lm_scores_words_when_complete(arpa: Path) -> None:
    lm, raw = NgramLM(arpa), kenlm.Model(str(arpa))
    state, delta = lm.advance(lm.begin(), "\u2581ca")
    assert delta == 0.0 and state.partial == "ca"
    state, delta = lm.advance(state, "t")
    assert delta == 0.0 and state.partial == "cat"
    state, delta = lm.advance(state, "\u2581sat")  # "cat" is complete now
    assert delta == pytest.approx(raw.score("cat", bos=True, eos=False) * math.log(10))
    assert lm.finish(state) == pytest.approx(
        (raw.score("cat sat", bos=True, eos=True) * math.log(10)) - delta
    )
    assert lm.finish(lm.begin()) == pytest.approx(raw.score("", bos=True, eos=True) * math.log(10))


def test_lm_from_bytes_and_errors(arpa: Path, tmp_path: Path) -> None:
    def scores(lm: NgramLM) -> tuple[float, float]:
        state, _ = lm.advance(lm.begin(), "\u2581cap")
        state, delta = lm.advance(state, "\u2581sat")
        return delta, lm.finish(state)

    by_path, by_bytes = NgramLM(arpa), NgramLM.from_bytes(arpa.read_bytes())
    assert scores(by_path) == scores(by_bytes)
    assert scores(by_path)[0] == pytest.approx((-0.5 - 3.0) * math.log(10))  # backoff(<s>) + p(cap)
    assert by_path.order == by_bytes.order == 2
    corrupt = tmp_path / "corrupt.arpa"
    corrupt.write_text("not an lm\n")
    with pytest.raises(ValueError, match="cannot read n-gram LM"):
        NgramLM(corrupt)
    with pytest.raises(
        ValueError, match=r"embedded n-gram LM \(22 bytes\) cannot be read: .*Bad count banana"
    ):
        NgramLM.from_bytes(b"\\data\\\nngram 1=banana\n")
    with pytest.raises(ValueError, match="cannot read n-gram LM"):
        NgramLM(tmp_path / "missing.arpa")


def lm_model() -> RNNT:
    """Frame type 0: "cap" a little more likely than "cat"; type 1: "sat"."""
    return scripted_model([{CAP: 15.1, CAT: 15.0}, {SAT: 15}])


def test_lm_scale_zero_changes_nothing(arpa: Path) -> None:
    model = lm_model()
    plain = BeamDecoder(model, BeamConfig())
    muted = BeamDecoder(model, BeamConfig(lm_scale=0.0), pieces=PIECES, lm=NgramLM(arpa))
    a, b = run(plain, [0, 1, 0]), run(muted, [0, 1, 0])
    assert plain.nbest(a, 4) == muted.nbest(b, 4)
    assert plain.commit(a) == muted.commit(b)


def test_lm_flips_a_close_call(arpa: Path) -> None:
    model, lm = lm_model(), NgramLM(arpa)
    plain = BeamDecoder(model, BeamConfig())
    fused = BeamDecoder(model, BeamConfig(), pieces=PIECES, lm=lm)
    assert ids(plain.best(run(plain, [0, 1]))) == [CAP, SAT]
    assert ids(fused.best(run(fused, [0, 1]))) == [CAT, SAT]  # "cap" scored once "sat" begins
    state = run(fused, [0])
    assert ids(fused.best(state)) == [CAP]  # no word is complete yet
    assert ids(fused.commit(state)) == [CAT]  # committing ends the sentence: both words are scored
    assert state.hyps[0].lm is not None and state.hyps[0].lm.partial == "cat"  # mid-stream: LM continues
    fused.commit(state, end_of_stream=True)
    assert state.hyps[0].lm == lm.begin()


def test_lm_needs_pieces(arpa: Path) -> None:
    with pytest.raises(ValueError, match="pieces"):
        BeamDecoder(lm_model(), BeamConfig(), lm=NgramLM(arpa))
