"""Greedy RNN-T decoding, batched over streams.

Per frame, each stream repeatedly takes the joint's argmax: blank moves on to the next frame, a
token is emitted and fed to the prediction network, at most `max_symbols` times per frame. All
streams still emitting in a round share one joint call and one prediction-network call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gharial.asr.batch_cache import BatchCache
from gharial.asr.decoding.base import Token, predict_projected, start_of_sequence
from gharial.asr.model import RNNT, LSTMState


@dataclass
class GreedyState:
    """One stream: prediction-network state after its last token, that output's joint projection,
    and the tokens emitted since the last commit."""

    pred: LSTMState  # [layers, 1, hidden]
    pred_projected: Tensor  # [joint hidden]
    tokens: list[Token] = field(default_factory=list)


class GreedyDecoder:
    def __init__(self, model: RNNT, max_symbols: int | None = None) -> None:
        self.model = model
        self.blank_id = model.blank_id
        self.max_symbols = max_symbols or model.cfg.max_symbols_per_step
        self._sos = start_of_sequence(model)
        # a live server steps the same streams frame after frame: reuse their batched states
        self._pred_states: BatchCache[LSTMState, LSTMState] = BatchCache(
            LSTMState.cat, LSTMState.split, LSTMState.select
        )
        self._pred_projections: BatchCache[Tensor, Tensor] = BatchCache(
            torch.stack, lambda batch: list(batch.unbind()), lambda batch, rows: batch[rows]
        )

    def initial_state(self) -> GreedyState:
        projected, pred = self._sos
        return GreedyState(pred=pred, pred_projected=projected[0])

    @torch.inference_mode()
    def advance(self, enc_projected: Tensor, states: Sequence[GreedyState], frames: Sequence[int]) -> None:
        pred_projected = self._pred_projections.gather([s.pred_projected for s in states])
        pred = self._pred_states.gather([s.pred for s in states])
        active = torch.arange(len(states))
        for _ in range(self.max_symbols):
            logits = self.model.joint.combine(enc_projected[active], pred_projected[active])
            best = logits.max(-1).indices  # argmax (ties: lowest index too), ~3x faster on CPU
            emitting = best != self.blank_id
            if not emitting.any():
                break
            active, best = active[emitting], best[emitting]
            for row, token in zip(active.tolist(), best.tolist(), strict=True):
                states[row].tokens.append(Token(token, frames[row]))
            projected, new_pred = predict_projected(self.model, best, pred.select(active))
            pred_projected[active] = projected
            pred = pred.put(active, new_pred)
        own_preds, own_projections = (
            self._pred_states.split(pred),
            self._pred_projections.split(pred_projected),
        )
        for state, own, projected_row in zip(states, own_preds, own_projections, strict=True):
            state.pred, state.pred_projected = own, projected_row

    def best(self, state: GreedyState) -> list[Token]:
        return list(state.tokens)

    def provisional(self, state: GreedyState) -> list[Token]:
        return list(state.tokens)

    def nbest(self, state: GreedyState, n: int) -> list[tuple[list[Token], float]]:
        return [(list(state.tokens), 0.0)]

    def commit(self, state: GreedyState, end_of_stream: bool = False) -> list[Token]:
        tokens, state.tokens = state.tokens, []
        return tokens
