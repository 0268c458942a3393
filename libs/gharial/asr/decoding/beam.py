"""Frame-synchronous RNN-T beam search, batched over streams and hypotheses.

Each stream keeps up to `width` hypotheses, all of which have consumed the same encoder frames.
Per frame, in rounds of at most `max_symbols`:

1. one joint call scores every still-continuing hypothesis of every stream;
2. each continuing hypothesis yields a "done" candidate (it emits blank and leaves the frame) and
   up to `token_topk` "continuing" candidates (it emits a token, `token_prune` permitting);
3. each stream pools its new candidates with the done hypotheses of earlier rounds; candidates
   with the same token ids and the same done/continuing flag are one hypothesis reached by two
   alignments and are merged by adding their probabilities; the pool keeps its best `width`
   (done and continuing together) within `beam_prune` of the best;
4. one prediction-network call feeds the last token of every surviving continuing hypothesis,
   only now, so candidates that lose never cost a predictor step.

After `max_symbols` rounds the hypotheses still continuing leave the frame as if done, as greedy
decoding moves on after `max_symbols` tokens. Ties go to the lower symbol sequence, a done
hypothesis counting as ending with blank (the highest id), which is the order greedy's argmax
breaks ties in: with width 1 every round picks the argmax of blank and the best token, so the
search is exactly greedy decoding.

A hypothesis's score is its temperature-scaled acoustic log-probability plus `lm_scale` times the
n-gram LM's log-probability of its words plus keyword bonuses.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from gharial.asr.decoding.base import Token, predict_projected, start_of_sequence
from gharial.asr.decoding.keywords import KeywordBoost, KeywordState
from gharial.asr.decoding.lm import LMState, NgramLM
from gharial.asr.model import RNNT, LSTMState


class BeamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(4, ge=1, description="hypotheses kept per stream")
    temperature: float = Field(1.4, gt=0, description="logits are divided by this before log_softmax")
    token_topk: int = Field(4, ge=1, description="non-blank tokens expanded per hypothesis per round")
    token_prune: float = Field(
        6.0, ge=0, description="expand only tokens within this of the hypothesis's best (scaled) log-prob"
    )
    beam_prune: float = Field(10.0, ge=0, description="drop hypotheses scoring this far below the best")
    lm_scale: float = Field(0.05, ge=0, description="weight of the n-gram LM's natural-log score")
    keyword_boost: float = Field(2.0, description="bonus per token matching a stream's keywords")
    max_symbols: int | None = Field(None, ge=1, description="tokens per frame; None: the model's setting")


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """Tokens since the last commit, their score, and everything needed to extend them."""

    tokens: tuple[Token, ...]
    score: float
    pred: LSTMState  # prediction-network state after the last token, [layers, 1, hidden]
    pred_projected: Tensor  # its output's joint projection, [joint hidden]
    lm: LMState | None = None
    keyword: KeywordState | None = None


@dataclass
class BeamState:
    """One stream: its hypotheses, best first, and its keywords (if any)."""

    hyps: list[Hypothesis]
    keywords: KeywordBoost | None = None


class _Path(NamedTuple):
    """A hypothesis during one frame's search. `key` is its token ids, followed by blank once done:
    the identity candidates are merged on and the tie-break order. `row` indexes the frame's
    prediction-network outputs: the state after all its tokens, or for a continuing candidate not
    yet fed to the predictor, its parent's state."""

    score: float
    key: tuple[int, ...]
    tokens: tuple[Token, ...]
    lm: LMState | None
    keyword: KeywordState | None
    row: int
    done: bool


def _log_add(a: float, b: float) -> float:
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


class BeamDecoder:
    def __init__(
        self,
        model: RNNT,
        config: BeamConfig | None = None,
        pieces: list[str] | None = None,
        lm: NgramLM | None = None,
    ) -> None:
        self.model = model
        self.config = config or BeamConfig()
        self.blank_id = model.blank_id
        self.max_symbols = self.config.max_symbols or model.cfg.max_symbols_per_step
        if lm is not None and (pieces is None or len(pieces) != model.cfg.vocab_size):
            raise ValueError(f"an LM needs the {model.cfg.vocab_size} sentencepiece pieces of the vocabulary")
        self.pieces = pieces
        self.lm = lm
        self._sos = start_of_sequence(model)

    def initial_state(self, keywords: list[list[int]] | None = None) -> BeamState:
        """A new stream; `keywords` (token-id sequences) are boosted in this stream only."""
        boost = KeywordBoost(keywords, self.config.keyword_boost) if keywords else None
        projected, pred = self._sos
        hyp = Hypothesis(
            tokens=(),
            score=0.0,
            pred=pred,
            pred_projected=projected[0],
            lm=self.lm.begin() if self.lm is not None else None,
            keyword=boost.initial() if boost is not None else None,
        )
        return BeamState([hyp], boost)

    @torch.inference_mode()
    def advance(self, enc_projected: Tensor, states: Sequence[BeamState], frames: Sequence[int]) -> None:
        if not states:
            return
        hyps = [h for s in states for h in s.hyps]
        streams = [i for i, s in enumerate(states) for _ in s.hyps]  # the stream of each continuing path
        preds = [LSTMState.cat([h.pred for h in hyps])]  # one batch per round, rows numbered across them
        projected = [torch.stack([h.pred_projected for h in hyps])]
        continuing = [
            _Path(h.score, tuple(t.id for t in h.tokens), h.tokens, h.lm, h.keyword, row, False)
            for row, h in enumerate(hyps)
        ]
        pools: list[dict[tuple[int, ...], _Path]] = [{} for _ in states]  # per stream, by key
        first_row = 0  # number of the latest batch's first row
        for _ in range(self.max_symbols):
            logits = self.model.joint.combine(enc_projected[torch.tensor(streams)], projected[-1])
            self._expand(logits, continuing, streams, pools, states, frames)
            continuing, streams = self._prune(pools, list(dict.fromkeys(streams)))
            if not continuing:
                break
            tokens = torch.tensor([p.tokens[-1].id for p in continuing])
            parents = torch.tensor([p.row - first_row for p in continuing])
            out, pred = predict_projected(self.model, tokens, preds[-1].select(parents))
            first_row += projected[-1].shape[0]
            preds.append(pred)
            projected.append(out)
            continuing = [p._replace(row=first_row + i) for i, p in enumerate(continuing)]
        for path, stream in zip(continuing, streams, strict=True):  # out of rounds: leave the frame
            self._merge(pools[stream], path._replace(key=(*path.key, self.blank_id), done=True))
        self._store(states, pools, preds, projected)

    def _expand(
        self,
        logits: Tensor,
        continuing: list[_Path],
        streams: list[int],
        pools: list[dict[tuple[int, ...], _Path]],
        states: Sequence[BeamState],
        frames: Sequence[int],
    ) -> None:
        """Add each continuing path's candidates to its stream's pool: blank, and its best tokens."""
        blank = self.blank_id
        # double precision keeps distinct logits distinct after scaling (width 1 must equal greedy)
        logp = (logits.double() / self.config.temperature).log_softmax(-1)
        top_lp, top_id = logp[:, :blank].topk(min(self.config.token_topk, blank), -1)
        token_floors = (logp.max(-1).values - self.config.token_prune).tolist()
        blank_lps, top_lps, top_ids = logp[:, blank].tolist(), top_lp.tolist(), top_id.tolist()
        for j, (path, stream) in enumerate(zip(continuing, streams, strict=True)):
            self._merge(
                pools[stream],
                path._replace(score=path.score + blank_lps[j], key=(*path.key, blank), done=True),
            )
        hopeless = {stream: self._hopeless_below(pools[stream]) for stream in dict.fromkeys(streams)}
        for j, (path, stream) in enumerate(zip(continuing, streams, strict=True)):
            boost = states[stream].keywords
            bonus = max(boost.boost, 0.0) if boost is not None else 0.0  # the most a token can gain
            for lp, token in zip(top_lps[j], top_ids[j], strict=True):
                if lp < token_floors[j] or path.score + lp + bonus < hopeless[stream]:
                    break  # sorted: the rest are pruned too
                self._merge(pools[stream], self._extend(path, token, lp, frames[stream], boost))

    def _hopeless_below(self, pool: dict[tuple[int, ...], _Path]) -> float:
        """A score under which no new token candidate can survive `_prune`, given the pool's done
        paths (whose scores can only rise by merging): `width` of them beat it, or it is beyond
        `beam_prune`. Skipping such candidates early changes nothing but the work done; it relies
        on LM scores being log-probabilities (≤ 0)."""
        scores = heapq.nlargest(self.config.width, (p.score for p in pool.values()))
        floor = scores[0] - self.config.beam_prune
        return max(floor, scores[-1]) if len(scores) == self.config.width else floor

    def _extend(self, path: _Path, token: int, lp: float, frame: int, boost: KeywordBoost | None) -> _Path:
        """`path` followed by `token`: acoustic, LM and keyword scores, predictor not yet run."""
        score, lm, keyword = path.score + lp, path.lm, path.keyword
        if self.lm is not None and self.pieces is not None and lm is not None:
            lm, delta = self.lm.advance(lm, self.pieces[token])
            score += self.config.lm_scale * delta
        if boost is not None and keyword is not None:
            keyword, delta = boost.advance(keyword, token)
            score += delta
        tokens = (*path.tokens, Token(token, frame))
        return _Path(score, (*path.key, token), tokens, lm, keyword, path.row, False)

    @staticmethod
    def _merge(pool: dict[tuple[int, ...], _Path], path: _Path) -> None:
        """Add `path`; the same hypothesis reached by another alignment adds its probability, and
        keeps the better alignment's tokens and states."""
        old = pool.get(path.key)
        if old is None:
            pool[path.key] = path
        else:
            better = path if path.score > old.score else old
            pool[path.key] = better._replace(score=_log_add(old.score, path.score))

    def _prune(
        self, pools: list[dict[tuple[int, ...], _Path]], touched: list[int]
    ) -> tuple[list[_Path], list[int]]:
        """Cut each touched stream's pool to its best paths. Done ones stay in the pool; continuing
        ones are returned (with their streams), to be fed to the predictor and expanded."""
        continuing: list[_Path] = []
        streams: list[int] = []
        for stream in touched:
            kept = self._best(pools[stream].values(), self.config.width)
            floor = kept[0].score - self.config.beam_prune
            kept = [p for p in kept if p.score >= floor]
            pools[stream] = {p.key: p for p in kept if p.done}
            for path in kept:
                if not path.done:
                    continuing.append(path)
                    streams.append(stream)
        return continuing, streams

    @staticmethod
    def _best(paths: Iterable[_Path], n: int) -> list[_Path]:
        """The n best paths, best first; ties broken by the lower key (see the module docstring)."""
        return heapq.nsmallest(n, paths, key=lambda p: (-p.score, p.key))

    def _store(
        self,
        states: Sequence[BeamState],
        pools: list[dict[tuple[int, ...], _Path]],
        preds: list[LSTMState],
        projected: list[Tensor],
    ) -> None:
        """Turn each stream's pool into its hypotheses for the next frame. Each stream's states are
        copied out of the frame's batches so that a stream never keeps other streams' data alive."""
        h = torch.cat([p.h for p in preds], 1)
        c = torch.cat([p.c for p in preds], 1)
        proj = torch.cat(projected)
        for state, pool in zip(states, pools, strict=True):
            paths = self._best(pool.values(), len(pool))
            rows = torch.tensor([p.row for p in paths])
            hs, cs, ps = h[:, rows].split(1, 1), c[:, rows].split(1, 1), proj[rows].unbind(0)
            state.hyps = [
                Hypothesis(p.tokens, p.score, LSTMState(hh, cc), pp, p.lm, p.keyword)
                for p, hh, cc, pp in zip(paths, hs, cs, ps, strict=True)
            ]

    def best(self, state: BeamState) -> list[Token]:
        return list(state.hyps[0].tokens)

    def provisional(self, state: BeamState) -> list[Token]:
        """The tokens all hypotheses agree on. Every later hypothesis extends one of today's, so
        this prefix only ever grows until the next commit, which keeps it too: final in all but name."""
        tokens = state.hyps[0].tokens
        n = len(tokens)
        for hyp in state.hyps[1:]:
            n = next(
                (i for i, (a, b) in enumerate(zip(tokens[:n], hyp.tokens, strict=False)) if a.id != b.id),
                min(n, len(hyp.tokens)),
            )
        return list(tokens[:n])

    def nbest(self, state: BeamState, n: int) -> list[tuple[list[Token], float]]:
        return [(list(h.tokens), h.score) for h in state.hyps[:n]]

    def final_score(self, state: BeamState, hyp: Hypothesis) -> float:
        """A hypothesis's score were the sentence to end here: the LM scores its last word and
        </s>, and keyword bonus still pending on a partial match is refunded."""
        score = hyp.score
        if self.lm is not None and hyp.lm is not None:
            score += self.config.lm_scale * self.lm.finish(hyp.lm)
        if state.keywords is not None and hyp.keyword is not None:
            score -= state.keywords.pending(hyp.keyword)
        return score

    def commit(self, state: BeamState, end_of_stream: bool = False) -> list[Token]:
        """Pick the best hypothesis by `final_score` and continue from it alone, its score reset to 0.
        Mid-stream (an endpoint, a state reset) its LM context and keyword match carry on, since the
        speaker may well continue the sentence; at end of stream they restart."""
        best = min(state.hyps, key=lambda h: (-self.final_score(state, h), [t.id for t in h.tokens]))
        lm, keyword = best.lm, best.keyword
        if end_of_stream:
            lm = self.lm.begin() if self.lm is not None else None
            keyword = state.keywords.initial() if state.keywords is not None else None
        state.hyps = [replace(best, tokens=(), score=0.0, lm=lm, keyword=keyword)]
        return list(best.tokens)
