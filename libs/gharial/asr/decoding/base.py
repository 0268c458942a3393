"""What every decoder shares: emitted tokens, and the interface the streaming recognizer drives.

A decoder owns no per-stream data: each stream's decoder state is an object the caller keeps and
hands back on every call, so the same decoder serves one offline utterance or thousands of
live streams batched into one call.

"Committing" is how results become final: the decoder picks its best hypothesis, hands its
tokens over, and continues from that hypothesis alone with an empty token list, so nothing it
has handed over can change any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from gharial.asr.model import RNNT, LSTMState


class Token(NamedTuple):
    """One emitted token and the 60 ms frame (since the stream started) in which it was emitted."""

    id: int
    frame: int


State = TypeVar("State")


class Decoder(Protocol[State]):
    def initial_state(self) -> State:
        """The state of a new stream (or a stream just after a state reset)."""
        ...

    def advance(self, enc_projected: Tensor, states: Sequence[State], frames: Sequence[int]) -> None:
        """Decode one encoder frame for each stream, in place. `enc_projected` [N, joint hidden] is
        the joint's projection of the N streams' encoder outputs; `frames` their frame indices."""
        ...

    def best(self, state: State) -> list[Token]:
        """Tokens of the best hypothesis since the last commit."""
        ...

    def provisional(self, state: State) -> list[Token]:
        """The part of the uncommitted output shown to users before it is final."""
        ...

    def nbest(self, state: State, n: int) -> list[tuple[list[Token], float]]:
        """Up to n hypotheses since the last commit with their log-scores, best first."""
        ...

    def commit(self, state: State, end_of_stream: bool = False) -> list[Token]:
        """Finalise: return the best hypothesis's tokens and continue from it alone, with none."""
        ...


def predict_projected(model: RNNT, tokens: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
    """Feed one token per row [N] to the prediction network → (its outputs already projected by
    the joint [N, joint hidden], new state). Decoders cache the projection per hypothesis."""
    out, new_state = model.predictor(tokens.unsqueeze(1), state)
    return model.joint.pred_proj(out[:, 0]), new_state


@torch.inference_mode()
def start_of_sequence(model: RNNT) -> tuple[Tensor, LSTMState]:
    """The prediction network's projected output and state after SOS: where every stream starts."""
    return predict_projected(model, torch.tensor([model.blank_id]), model.predictor.initial_state(1))
