"""RNN-T loss (Graves 2012) in plain PyTorch, for logits [B, T, U+1, V+1] from the joint.

Lattice: node (t, u) means "t frames read, u target tokens emitted". From (t, u) the model either emits
blank and moves to (t+1, u), or emits the next target y[u] and moves to (t, u+1). With log-probs
blank[t, u] = log p(∅ | t, u) and emit[t, u] = log p(y[u] | t, u), the forward variables are

    alpha[0, 0] = 0
    alpha[t, u] = logaddexp(alpha[t-1, u] + blank[t-1, u], alpha[t, u-1] + emit[t, u-1])

and an utterance of T frames and U tokens has log P(y | x) = alpha[T-1, U] + blank[T-1, U]: every
alignment ends with a blank from the last node. The backward variables run the same recursion from the
other end, beta[t, u] = logaddexp(beta[t+1, u] + blank[t, u], beta[t, u+1] + emit[t, u]), starting
from a virtual terminal node beta[T, U] = 0. Both recursions walk anti-diagonals n = t + u: every node
of a diagonal depends only on the previous one, so each of the T+U steps is a few ops on a [B, U+1]
row for the whole batch. The lattice is "skewed" once so that diagonal n is row n of a [B, T+U+1, U+1]
tensor.

Memory: the logits are by far the largest tensor (B·T·U·V). Differentiating through log_softmax would
keep a second tensor that size alive between forward and backward. Instead a custom autograd Function
keeps the logits (which exist anyway) plus [B, T, U+1] tensors: the normaliser logZ = logsumexp over V,
alpha, beta and the two gathered log-prob lattices. Backward builds the gradient directly:

    d(-log P)/d logits[t, u, v] = softmax[t, u, v] · γ(t, u) - γ_blank(t, u)·[v = ∅] - γ_emit(t, u)·[v = y[u]]

where γ(t, u) = exp(alpha + beta - log P) is the posterior occupancy of node (t, u) and γ_blank, γ_emit
those of its two outgoing edges. That allocates the one B·T·U·V gradient tensor and nothing else of
that size. Alpha and beta are accumulated in float32 (float64 for float64 logits).

Padding: logits past each utterance's (T_b, U_b) and targets past U_b may hold anything; they neither
change the loss nor receive gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def rnnt_loss(
    logits: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    blank_id: int,
    reduction: Literal["mean", "sum", "none"] = "mean",
    delay_penalty: float = 0.0,
) -> Tensor:
    """Negative log-likelihood -log P(y | x) of each utterance under the RNN-T lattice.

    logits [B, T, U+1, V+1] (unnormalised joint outputs), targets [B, U] int64 (padded with anything),
    logit_lengths [B] valid frames (1 ≤ T_b ≤ T), target_lengths [B] valid tokens (0 ≤ U_b ≤ U).
    Valid targets must lie in [0, V] and differ from blank_id.
    reduction: "none" → [B]; "sum" → scalar; "mean" → scalar mean over utterances (not over tokens or
    frames), like torchaudio's default.
    delay_penalty λ > 0 (training only; Kang et al. 2022, as in k2): every token emission at frame t
    scores λ·((T_b − 1)/2 − t) extra, so paths that emit early are preferred; the value returned is
    then no longer the pure -log P(y | x).
    """
    b, _, u1, v1 = logits.shape
    if targets.shape != (b, u1 - 1):
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if logit_lengths.shape != (b,) or target_lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},)")
    if not 0 <= blank_id < v1:
        raise ValueError(f"blank_id {blank_id} outside the {v1} classes")
    losses = _RNNTLoss.apply(logits, targets, logit_lengths, target_lengths, blank_id, delay_penalty)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


class _RNNTLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        logit_lengths: Tensor,
        target_lengths: Tensor,
        blank_id: int,
        delay_penalty: float,
    ) -> Tensor:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        b, t, u1, _ = logits.shape
        t_len = logit_lengths.to(logits.device, torch.long)
        u_len = target_lengths.to(logits.device, torch.long)

        tokens = next_tokens(targets.to(logits.device), u_len)
        log_z = torch.logsumexp(logits.to(acc), dim=-1)  # [B, T, U+1]
        blank = logits[..., blank_id].to(acc) - log_z
        emit = logits.gather(-1, tokens[:, None, :, None].expand(b, t, u1, 1)).squeeze(-1).to(acc) - log_z
        blank, emit = mask_lattice(blank, emit, t_len, u_len, delay_penalty)
        alpha, beta = alpha_beta(blank, emit, t_len, u_len)
        log_p = final_log_prob(alpha, blank, t_len, u_len)

        ctx.blank_id = blank_id
        ctx.save_for_backward(logits, tokens, log_z, blank, emit, alpha, beta, log_p)
        return (-log_p).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        logits, tokens, log_z, blank, emit, alpha, beta, log_p = ctx.saved_tensors
        b, t, u1, _ = logits.shape
        occupancy = node_occupancy(alpha, beta, log_p)  # 0 outside the lattice: alpha is -inf there
        blank_edge, emit_edge = edge_posteriors(blank, emit, alpha, beta, log_p)

        grad = logits.to(occupancy.dtype, copy=True)  # the one B·T·U·V allocation
        grad.sub_(log_z[..., None]).exp_().mul_(occupancy[..., None])
        grad.masked_fill_(occupancy[..., None] == 0, 0.0)  # padding may hold inf/nan garbage
        grad[..., ctx.blank_id] -= blank_edge
        grad.scatter_add_(-1, tokens[:, None, :, None].expand(b, t, u1, 1), -emit_edge[..., None])
        grad.mul_(grad_out.to(grad.dtype)[:, None, None, None])
        return grad.to(logits.dtype), None, None, None, None, None


def next_tokens(targets: Tensor, u_len: Tensor) -> Tensor:
    """[B, U] targets → [B, U+1] long: the token emitted from node u, 0 where there is none."""
    has_next = torch.arange(targets.shape[1] + 1, device=targets.device)[None, :] < u_len[:, None]
    return F.pad(targets.long(), (0, 1)).masked_fill(~has_next, 0)


def mask_lattice(
    blank: Tensor, emit: Tensor, t_len: Tensor, u_len: Tensor, delay_penalty: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Log-prob lattices [B, T, U+1] with -inf outside each utterance's lattice (and on the emit
    edges out of its last row u = U_b), plus the delay penalty on the emit edges."""
    _, t, u1 = blank.shape
    t_idx = torch.arange(t, device=blank.device)
    u_idx = torch.arange(u1, device=blank.device)
    valid = (t_idx[None, :, None] < t_len[:, None, None]) & (u_idx[None, None, :] <= u_len[:, None, None])
    has_next = u_idx[None, None, :] < u_len[:, None, None]
    if delay_penalty:
        centre = (t_len[:, None, None] - 1) / 2
        emit = emit + delay_penalty * (centre - t_idx[None, :, None]).to(emit.dtype)
    return blank.masked_fill(~valid, NEG_INF), emit.masked_fill(~(valid & has_next), NEG_INF)


def final_log_prob(alpha: Tensor, blank: Tensor, t_len: Tensor, u_len: Tensor) -> Tensor:
    """log P(y | x) [B]: every alignment ends with a blank from the last node (T_b - 1, U_b)."""
    rows = torch.arange(alpha.shape[0], device=alpha.device)
    return alpha[rows, t_len - 1, u_len] + blank[rows, t_len - 1, u_len]


def node_occupancy(alpha: Tensor, beta: Tensor, log_p: Tensor) -> Tensor:
    """Posterior probability [B, T, U+1] that an alignment passes node (t, u)."""
    return torch.exp(alpha + beta[:, : alpha.shape[1]] - log_p[:, None, None])


def edge_posteriors(
    blank: Tensor, emit: Tensor, alpha: Tensor, beta: Tensor, log_p: Tensor
) -> tuple[Tensor, Tensor]:
    """Posterior probabilities [B, T, U+1] of the blank and of the emit edge out of each node."""
    t = alpha.shape[1]
    log_p = log_p[:, None, None]
    # beta has an extra frame row (the terminal node); beta of the successor via blank / via emit.
    beta_after_emit = F.pad(beta[:, :t, 1:], (0, 1), value=NEG_INF)
    return torch.exp(alpha + blank + beta[:, 1:] - log_p), torch.exp(alpha + emit + beta_after_emit - log_p)


@torch.no_grad()
def alpha_beta(blank: Tensor, emit: Tensor, t_len: Tensor, u_len: Tensor) -> tuple[Tensor, Tensor]:
    """Forward and backward variables for masked log-prob lattices blank, emit [B, T, U+1].

    Returns alpha [B, T, U+1] and beta [B, T+1, U+1] (the extra row holds the terminal node (T_b, U_b)),
    both -inf outside each utterance's lattice.
    """
    b, t, u1 = blank.shape
    n_diag = t + u1  # diagonals n = t + u for t in [0, T], the last frame row being the terminal node
    blank_s, emit_s = _skew(blank, n_diag), _skew(emit, n_diag)

    n = torch.arange(n_diag, device=blank.device)[None, :, None]
    u = torch.arange(u1, device=blank.device)[None, None, :]
    frame = n - u
    inside = (frame >= 0) & (frame < t_len[:, None, None]) & (u <= u_len[:, None, None])  # [B, N, U+1]
    terminal = (frame == t_len[:, None, None]) & (u == u_len[:, None, None])

    alphas = [F.pad(blank.new_zeros(b, 1), (0, u1 - 1), value=NEG_INF)]  # alpha[0, 0] = 0
    for i in range(1, n_diag - 1):  # the last diagonal has no lattice node (it is at best terminal)
        prev = alphas[-1]
        stay = prev + blank_s[:, i - 1]
        move = F.pad((prev + emit_s[:, i - 1])[:, :-1], (1, 0), value=NEG_INF)
        alphas.append(torch.logaddexp(stay, move).masked_fill(~inside[:, i], NEG_INF))
    alpha = _unskew(torch.stack(alphas, 1), t)

    nxt = blank.new_full((b, u1), NEG_INF)
    betas = []
    for i in reversed(range(n_diag)):
        stay = nxt + blank_s[:, i]
        move = F.pad(nxt[:, 1:], (0, 1), value=NEG_INF) + emit_s[:, i]
        nxt = torch.logaddexp(stay, move).masked_fill(~inside[:, i], NEG_INF).masked_fill(terminal[:, i], 0.0)
        betas.append(nxt)
    beta = _unskew(torch.stack(betas[::-1], 1), t + 1)
    return alpha, beta


def _skew(x: Tensor, n_diag: int) -> Tensor:
    """[B, T, U+1] → [B, n_diag, U+1] with out[:, t + u, u] = x[:, t, u]; -inf elsewhere."""
    b, t, u1 = x.shape
    out = x.new_full((b, n_diag, u1), NEG_INF)
    u = torch.arange(u1, device=x.device)
    out[:, torch.arange(t, device=x.device)[:, None] + u, u] = x
    return out


def _unskew(x: Tensor, t: int) -> Tensor:
    """Inverse of _skew: [B, N, U+1] → [B, t, U+1], out[:, t, u] = x[:, t + u, u] (needs N ≥ t + U)."""
    u = torch.arange(x.shape[2], device=x.device)
    return x[:, torch.arange(t, device=x.device)[:, None] + u, u]
