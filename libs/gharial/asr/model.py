"""The LSTM RNN-T: encoder, prediction network and joint, in one page.

Shapes (B batch, T 30 ms features, F feature dim, U tokens, V vocab):
    encoder:   [B, T, F] → [B, T/2, H_enc]    (pre-RNN at 30 ms, StackTime ×2, post-RNN at 60 ms)
    predictor: [B, U] token ids → [B, U, H_pred]   (blank id = SOS, embedded as zeros)
    joint:     enc [.., H_enc] + pred [.., H_pred] → logits [.., V + 1]   (blank last)

Every recurrent piece takes and returns its state explicitly, so the same module runs a whole
utterance at once (training, offline decoding) or one 60 ms frame at a time (streaming).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from gharial.asr.config import ModelConfig


class LSTMState(NamedTuple):
    """(h, c) of a stack of LSTM layers, each [layers, B, hidden]."""

    h: Tensor
    c: Tensor

    @staticmethod
    def zeros(layers: int, batch: int, hidden: int, like: Tensor) -> LSTMState:
        z = like.new_zeros(layers, batch, hidden)
        return LSTMState(z, z.clone())

    def select(self, rows: Tensor) -> LSTMState:
        """The states of batch rows `rows` (a LongTensor of indices)."""
        return LSTMState(self.h[:, rows], self.c[:, rows])

    def put(self, rows: Tensor, new: LSTMState) -> LSTMState:
        """A copy with batch rows `rows` replaced by `new`."""
        h, c = self.h.clone(), self.c.clone()
        h[:, rows], c[:, rows] = new.h, new.c
        return LSTMState(h, c)

    @staticmethod
    def cat(states: list[LSTMState]) -> LSTMState:
        return LSTMState(torch.cat([s.h for s in states], 1), torch.cat([s.c for s in states], 1))

    def split(self) -> list[LSTMState]:
        """One state per batch row (views, [layers, 1, hidden] each): the inverse of cat."""
        return [LSTMState(h, c) for h, c in zip(self.h.split(1, 1), self.c.split(1, 1), strict=True)]


class EncoderState(NamedTuple):
    pre: LSTMState
    post: LSTMState

    @staticmethod
    def cat(states: list[EncoderState]) -> EncoderState:
        return EncoderState(LSTMState.cat([s.pre for s in states]), LSTMState.cat([s.post for s in states]))

    def select(self, rows: Tensor) -> EncoderState:
        """The states of batch rows `rows` (a LongTensor of indices)."""
        return EncoderState(self.pre.select(rows), self.post.select(rows))

    def split(self) -> list[EncoderState]:
        return [
            EncoderState(pre, post) for pre, post in zip(self.pre.split(), self.post.split(), strict=True)
        ]


def stack_time(x: Tensor, factor: int) -> Tensor:
    """[B, T, D] → [B, T/factor, factor·D]: concatenate each run of `factor` frames (T divisible)."""
    b, t, d = x.shape
    if t % factor:
        raise ValueError(f"StackTime needs a multiple of {factor} frames, got {t}")
    return x.reshape(b, t // factor, factor * d)


def lstm(inputs: int, hidden: int, layers: int, dropout: float) -> nn.LSTM:
    """A batch-first LSTM with `dropout` between its layers (torch applies none after the last)."""
    return nn.LSTM(inputs, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)


class Encoder(nn.Module):
    state_like: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc = cfg.encoder
        self.stack = enc.stack_time
        # Dropout (training only; identity in eval mode, so serving never sees it) between LSTM
        # layers and on the stacked pre-RNN output; it adds no parameters.
        self.pre_rnn = lstm(cfg.features.feature_dim, enc.hidden, enc.pre_rnn_layers, enc.dropout)
        self.dropout = nn.Dropout(enc.dropout)
        self.post_rnn = lstm(enc.stack_time * enc.hidden, enc.hidden, enc.post_rnn_layers, enc.dropout)
        # Where initial states take their dtype and device from; a buffer, because int8 dynamic
        # quantization leaves the encoder without float parameters. Not saved in checkpoints.
        self.register_buffer("state_like", torch.zeros(0), persistent=False)

    def initial_state(self, batch: int) -> EncoderState:
        like = self.state_like
        return EncoderState(
            LSTMState.zeros(self.pre_rnn.num_layers, batch, self.pre_rnn.hidden_size, like),
            LSTMState.zeros(self.post_rnn.num_layers, batch, self.post_rnn.hidden_size, like),
        )

    def forward(self, x: Tensor, state: EncoderState | None = None) -> tuple[Tensor, EncoderState]:
        """x [B, T, F] with T a multiple of stack_time → ([B, T/stack_time, H], new state)."""
        _, y, state = self.forward_layers(x, state)
        return y, state

    def forward_layers(
        self, x: Tensor, state: EncoderState | None = None
    ) -> tuple[Tensor, Tensor, EncoderState]:
        """Like `forward`, also returning the pre-RNN output [B, T, H] (what an intermediate loss
        in training reads)."""
        state = state or self.initial_state(x.shape[0])
        below, pre = self.pre_rnn(x, tuple(state.pre))
        y, post = self.post_rnn(self.dropout(stack_time(below, self.stack)), tuple(state.post))
        return below, y, EncoderState(LSTMState(*pre), LSTMState(*post))


class Predictor(nn.Module):
    """Prediction network: embedding of the previous token + LSTM. Blank (= SOS) embeds to zeros."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blank_id = cfg.blank_id
        pred = cfg.predictor
        self.embed = nn.Embedding(cfg.vocab_size, pred.hidden)
        self.dropout = nn.Dropout(pred.dropout)  # training only, like the encoder's
        self.rnn = lstm(pred.hidden, pred.hidden, pred.layers, pred.dropout)

    def initial_state(self, batch: int) -> LSTMState:
        return LSTMState.zeros(self.rnn.num_layers, batch, self.rnn.hidden_size, self.embed.weight)

    def forward(self, tokens: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """tokens [B, U] (blank_id allowed, meaning SOS) → ([B, U, H], new state)."""
        state = state or self.initial_state(tokens.shape[0])
        is_sos = tokens == self.blank_id
        emb = self.embed(tokens.masked_fill(is_sos, 0)) * (~is_sos).unsqueeze(-1).to(self.embed.weight.dtype)
        y, (h, c) = self.rnn(self.dropout(emb), tuple(state))
        return y, LSTMState(h, c)


class Joint(nn.Module):
    """logits = out(ReLU(enc_proj(f) + pred_proj(g))). Projections are split out so decoders cache them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.enc_proj = nn.Linear(cfg.encoder.hidden, cfg.joint.hidden)
        self.pred_proj = nn.Linear(cfg.predictor.hidden, cfg.joint.hidden)
        self.out = nn.Linear(cfg.joint.hidden, cfg.vocab_size + 1)

    def combine(self, enc_projected: Tensor, pred_projected: Tensor) -> Tensor:
        """Logits from already-projected inputs (any broadcastable shapes)."""
        return self.out(torch.relu(enc_projected + pred_projected))

    def forward(self, enc: Tensor, pred: Tensor) -> Tensor:
        """The full lattice for training: enc [B, T, He], pred [B, U+1, Hp] → [B, T, U+1, V+1]."""
        return self.combine(self.enc_proj(enc).unsqueeze(2), self.pred_proj(pred).unsqueeze(1))


class RNNT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        self.joint = Joint(cfg)

    @property
    def blank_id(self) -> int:
        return self.cfg.blank_id

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        """Training lattice: features [B, T, F], targets [B, U] (padded with anything) → logits
        [B, T/2, U+1, V+1]. Padding past each sequence's length never influences valid positions
        because every recurrence runs forwards in time."""
        enc, _ = self.encoder(features)
        sos = targets.new_full((targets.shape[0], 1), self.blank_id)
        pred, _ = self.predictor(torch.cat([sos, targets], 1))
        return self.joint(enc, pred)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
