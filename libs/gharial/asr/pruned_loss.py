"""Pruned RNN-T loss (Kuang et al. 2022, "Pruned RNN-T for fast, memory-efficient ASR training"),
in plain PyTorch on top of `gharial.asr.loss`'s lattice recursion.

The full loss runs the joint network on every (frame, token) pair: a [B, T, U+1, V+1] tensor whose
joint, softmax and gradient are most of a training step on a CPU. Almost all of that lattice has
next to no probability: at frame t the alignment is near one position u. So:

1. A *simple* joint, logits(t, u) = am[t] + lm[u] (linear heads on the encoder and prediction
   network outputs), gives a full lattice cheaply: its normaliser logsumexp_v(am[t, v] + lm[u, v])
   is one [T, V] × [V, U+1] matrix product in exp space. Its loss is trained beside the real one.
2. Its node occupancies (posterior probability that the alignment passes (t, u)) choose, per frame,
   a window of `s_range` consecutive token positions holding the most probability mass (`prune_starts`),
   kept monotonic and connected so that every utterance still has complete paths.
3. The real joint runs only inside the windows: [B, T, s_range, V+1] instead of [B, T, U+1, V+1].
   Its log-probs are scattered into a lattice that is -inf outside the windows, and the same
   forward-backward recursion as the full loss gives -log P over the paths that stay inside.

With s_range ≥ U+1 the window is the whole lattice and the pruned loss equals the full one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gharial.asr.loss import (
    NEG_INF,
    alpha_beta,
    edge_posteriors,
    final_log_prob,
    mask_lattice,
    next_tokens,
    node_occupancy,
)
from gharial.asr.model import Joint

SMALLEST_NORMALISER = 1e-30  # floor of the simple joint's exp-space normaliser (no log(0))


def lattice_nll(blank: Tensor, emit: Tensor, t_len: Tensor, u_len: Tensor) -> tuple[Tensor, Tensor]:
    """-log P(y | x) [B] of masked log-prob lattices blank, emit [B, T, U+1] (see `mask_lattice`),
    differentiable in both, and the node occupancies [B, T, U+1] (not differentiable)."""
    nll, occupancy = _LatticeNLL.apply(blank, emit, t_len, u_len)
    return nll, occupancy


class _LatticeNLL(torch.autograd.Function):
    """d(-log P)/d blank[t, u] = -(posterior of the blank edge out of (t, u)), likewise for emit."""

    @staticmethod
    def forward(ctx: Any, blank: Tensor, emit: Tensor, t_len: Tensor, u_len: Tensor) -> tuple[Tensor, Tensor]:
        alpha, beta = alpha_beta(blank, emit, t_len, u_len)
        log_p = final_log_prob(alpha, blank, t_len, u_len)
        occupancy = node_occupancy(alpha, beta, log_p)
        ctx.save_for_backward(blank, emit, alpha, beta, log_p)
        ctx.mark_non_differentiable(occupancy)
        return -log_p, occupancy

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        blank, emit, alpha, beta, log_p = ctx.saved_tensors
        blank_edge, emit_edge = edge_posteriors(blank, emit, alpha, beta, log_p)
        scale = -grad_nll[:, None, None]
        return blank_edge * scale, emit_edge * scale, None, None


def simple_lattice(am: Tensor, lm: Tensor, tokens: Tensor, blank_id: int) -> tuple[Tensor, Tensor]:
    """Blank and emit log-prob lattices [B, T, U+1] of the simple joint logits(t, u) = am[t] + lm[u],
    from am [B, T, V+1], lm [B, U+1, V+1] (float32) and tokens [B, U+1] (`next_tokens`)."""
    am_max = am.detach().amax(-1, keepdim=True)  # [B, T, 1]
    lm_max = lm.detach().amax(-1, keepdim=True)  # [B, U+1, 1]
    products = torch.matmul((am - am_max).exp(), (lm - lm_max).exp().transpose(1, 2))  # [B, T, U+1]
    log_z = products.clamp_min(SMALLEST_NORMALISER).log() + am_max + lm_max.transpose(1, 2)
    b, t, _ = am.shape
    blank = am[..., blank_id, None] + lm[..., blank_id][:, None, :] - log_z
    am_emit = am.gather(-1, tokens[:, None, :].expand(b, t, -1))
    emit = am_emit + lm.gather(-1, tokens[..., None]).squeeze(-1)[:, None, :] - log_z
    return blank, emit


def prune_starts(occupancy: Tensor, t_len: Tensor, u_len: Tensor, s_range: int) -> Tensor:
    """First token position [B, T] (long) of each frame's window of `s_range` positions.

    Each window holds the most occupancy it can, subject to what keeps complete paths inside:
    frame 0 starts at 0, the last frame's window holds U_b, starts never decrease, and
    consecutive starts differ by at most s_range - 1 (so the windows of frames t and t + 1 share
    a position that a blank can cross). `s_range` must not exceed U + 1 (the lattice's width).
    """
    t = occupancy.shape[1]
    cumulative = F.pad(occupancy.cumsum(-1), (1, 0))  # [B, T, U+2]
    window_mass = cumulative[..., s_range:] - cumulative[..., :-s_range]  # [B, T, U+2-s_range]
    starts = window_mass.argmax(-1)
    highest = (u_len + 1 - s_range).clamp(min=0)[:, None]  # the window that holds U_b
    frames = torch.arange(t, device=occupancy.device)[None, :]
    starts = torch.where(frames >= t_len[:, None] - 1, highest, torch.minimum(starts, highest))
    starts = starts.cummax(1).values
    step = s_range - 1
    # start_t ≥ start_k - step·(k - t) for every later frame k: a reverse running maximum.
    starts = (starts - step * frames).flip(1).cummax(1).values.flip(1) + step * frames
    return torch.minimum(starts, step * frames)  # start_t ≤ step·t: frame 0 starts at 0


def pruned_lattice(
    joint: Joint, enc: Tensor, pred: Tensor, tokens: Tensor, starts: Tensor, s_range: int, blank_id: int
) -> tuple[Tensor, Tensor]:
    """Blank and emit log-prob lattices [B, T, U+1] of the real joint, computed only inside each
    frame's window [starts, starts + s_range) and -inf elsewhere. enc [B, T, He], pred [B, U+1, Hp]."""
    b, t, _ = enc.shape
    positions = starts[..., None] + torch.arange(s_range, device=enc.device)  # [B, T, S]
    pred_projected = joint.pred_proj(pred)  # [B, U+1, H]
    hidden = pred_projected.shape[-1]
    windows = pred_projected.gather(1, positions.reshape(b, -1, 1).expand(-1, -1, hidden))
    logits = joint.combine(joint.enc_proj(enc)[:, :, None], windows.reshape(b, t, s_range, hidden))
    log_probs = logits.float().log_softmax(-1)  # [B, T, S, V+1]
    window_tokens = tokens.gather(1, positions.reshape(b, -1)).reshape(b, t, s_range)
    inside_blank = log_probs[..., blank_id]
    inside_emit = log_probs.gather(-1, window_tokens[..., None]).squeeze(-1)
    outside = log_probs.new_full((b, t, pred.shape[1]), NEG_INF)
    return outside.scatter(2, positions, inside_blank), outside.scatter(2, positions, inside_emit)


def pruned_rnnt_loss(
    joint: Joint, enc: Tensor, pred: Tensor, am: Tensor, lm: Tensor, targets: Tensor,
    t_len: Tensor, u_len: Tensor, blank_id: int, s_range: int, delay_penalty: float = 0.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(simple loss [B], pruned loss [B]), both -log P(y | x) per utterance.

    enc [B, T, He] and pred [B, U+1, Hp] feed the real joint; am [B, T, V+1] and lm [B, U+1, V+1]
    are the simple joint's two halves; targets [B, U]. The simple lattice's occupancies choose the
    windows; no gradient flows through that choice. delay_penalty as in `rnnt_loss` (on both).
    """
    t_len, u_len = t_len.to(enc.device, torch.long), u_len.to(enc.device, torch.long)
    targets = targets.to(enc.device)
    s_range = min(s_range, pred.shape[1])
    tokens = next_tokens(targets, u_len)  # [B, U+1]: the token emitted from each row
    simple_blank, simple_emit = simple_lattice(am.float(), lm.float(), tokens, blank_id)
    simple, occupancy = lattice_nll(*mask_lattice(simple_blank, simple_emit, t_len, u_len, delay_penalty),
                                    t_len, u_len)  # fmt: skip
    starts = prune_starts(occupancy, t_len, u_len, s_range)
    blank, emit = pruned_lattice(joint, enc, pred, tokens, starts, s_range, blank_id)
    pruned, _ = lattice_nll(*mask_lattice(blank, emit, t_len, u_len, delay_penalty), t_len, u_len)
    return simple, pruned
