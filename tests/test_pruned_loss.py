"""Pruned RNN-T loss: equal to the full loss when the window is the whole lattice, an upper bound
of it otherwise, windows that always leave complete paths, and a simple joint that is exactly
log_softmax(am[t] + lm[u])."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gharial.asr.config import ModelConfig
from gharial.asr.loss import mask_lattice, next_tokens, rnnt_loss
from gharial.asr.model import Joint
from gharial.asr.pruned_loss import lattice_nll, prune_starts, pruned_rnnt_loss, simple_lattice

VOCAB = 12  # pieces; blank is index VOCAB


def small_joint(seed: int) -> Joint:
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({
        "name": "pruned-test", "vocab_size": VOCAB,
        "encoder": {"pre_rnn_layers": 1, "post_rnn_layers": 1, "hidden": 8},
        "predictor": {"hidden": 6, "layers": 1}, "joint": {"hidden": 10},
    })  # fmt: skip
    return Joint(cfg).double()


def random_inputs(t_lens: list[int], u_lens: list[int], seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t, u = len(t_lens), max(t_lens), max(u_lens)
    return {
        "enc": torch.randn(b, t, 8, generator=g, dtype=torch.float64, requires_grad=True),
        "pred": torch.randn(b, u + 1, 6, generator=g, dtype=torch.float64, requires_grad=True),
        "am": (torch.randn(b, t, VOCAB + 1, generator=g, dtype=torch.float64) * 2).requires_grad_(),
        "lm": (torch.randn(b, u + 1, VOCAB + 1, generator=g, dtype=torch.float64) * 2).requires_grad_(),
        "targets": torch.randint(0, VOCAB, (b, u), generator=g),
        "t_len": torch.tensor(t_lens),
        "u_len": torch.tensor(u_lens),
    }


@pytest.mark.parametrize("delay_penalty", [0.0, 0.05])
def test_a_window_as_wide_as_the_lattice_gives_the_full_loss_and_its_gradients(delay_penalty: float) -> None:
    joint, x = small_joint(0), random_inputs([9, 7, 4, 1], [5, 3, 0, 2], seed=1)
    full = rnnt_loss(joint(x["enc"], x["pred"]), x["targets"], x["t_len"], x["u_len"], VOCAB, "none",
                     delay_penalty)  # fmt: skip
    _, pruned = pruned_rnnt_loss(joint, x["enc"], x["pred"], x["am"], x["lm"], x["targets"], x["t_len"],
                                 x["u_len"], VOCAB, s_range=6, delay_penalty=delay_penalty)  # fmt: skip
    torch.testing.assert_close(pruned.double(), full, rtol=1e-5, atol=1e-5)
    full_grads = torch.autograd.grad(full.sum(), [x["enc"], x["pred"], *joint.parameters()])
    pruned_grads = torch.autograd.grad(pruned.sum(), [x["enc"], x["pred"], *joint.parameters()])
    for a, b in zip(full_grads, pruned_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 8)), min_size=1, max_size=4),
    s_range=st.integers(2, 5),
    seed=st.integers(0, 10_000),
)
def test_a_narrower_window_keeps_fewer_paths_and_never_loses_them_all(
    lengths: list[tuple[int, int]], s_range: int, seed: int
) -> None:
    """Pruning removes alignments, so -log P can only grow; every utterance that fits the windows
    (at most s_range - 1 tokens a frame) keeps a complete path: its loss stays finite."""
    t_lens = [max(t, -(-u // (s_range - 1))) for t, u in lengths]
    u_lens = [u for _, u in lengths]
    joint, x = small_joint(seed), random_inputs(t_lens, u_lens, seed)
    full = rnnt_loss(joint(x["enc"], x["pred"]), x["targets"], x["t_len"], x["u_len"], VOCAB, "none")
    simple, pruned = pruned_rnnt_loss(joint, x["enc"], x["pred"], x["am"], x["lm"], x["targets"], x["t_len"],
                                      x["u_len"], VOCAB, s_range=s_range)  # fmt: skip
    assert torch.isfinite(pruned).all() and torch.isfinite(simple).all()
    assert (pruned.double() >= full - 1e-4).all()
    grads = torch.autograd.grad(pruned.sum() + simple.sum(), [x["enc"], x["pred"], x["am"], x["lm"]])
    assert all(torch.isfinite(g).all() for g in grads)


@settings(max_examples=60, deadline=None)
@given(
    t_lens=st.lists(st.integers(1, 15), min_size=1, max_size=4),
    u_max=st.integers(0, 10),
    s_range=st.integers(2, 6),
    seed=st.integers(0, 10_000),
)
def test_windows_start_at_zero_end_on_the_last_token_and_stay_connected(
    t_lens: list[int], u_max: int, s_range: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    u_lens = torch.randint(0, u_max + 1, (len(t_lens),), generator=g)
    t_len = torch.tensor([max(t, -(-int(u) // (s_range - 1))) for t, u in zip(t_lens, u_lens, strict=True)])
    u1 = int(u_lens.max()) + 1
    s_range = min(s_range, u1)
    occupancy = torch.rand(len(t_lens), int(t_len.max()), u1, generator=g) ** 4  # peaky, anywhere
    starts = prune_starts(occupancy, t_len, u_lens, s_range)
    for row, (frames, tokens) in enumerate(zip(t_len.tolist(), u_lens.tolist(), strict=True)):
        s = starts[row, :frames]
        assert s[0] == 0, "node (0, 0) is inside frame 0's window"
        assert s[-1] <= tokens <= s[-1] + s_range - 1, "the last frame's window holds U_b"
        steps = s[1:] - s[:-1]
        assert (steps >= 0).all() and (steps <= s_range - 1).all(), "windows overlap frame to frame"
        assert (s >= 0).all() and (s + s_range <= u1).all(), "windows lie inside the lattice"


def test_windows_follow_the_occupancy() -> None:
    """Where the occupancy is a single clear path, each window is placed around it."""
    path = [0, 0, 1, 3, 4, 4, 6, 7]  # token position at each frame
    occupancy = torch.zeros(1, len(path), 8)
    occupancy[0, torch.arange(len(path)), torch.tensor(path)] = 1.0
    starts = prune_starts(occupancy, torch.tensor([len(path)]), torch.tensor([7]), s_range=2)
    s = starts[0].tolist()
    assert all(start <= u < start + 2 for start, u in zip(s, path, strict=True)), s


def test_the_simple_lattice_is_the_log_softmax_of_the_summed_halves() -> None:
    x = random_inputs([5, 3], [4, 2], seed=3)
    am, lm, targets, u_len = x["am"].float(), x["lm"].float(), x["targets"], x["u_len"]
    am = am * 30  # large logits: the exp-space product must stay exact, not overflow
    blank, emit = simple_lattice(am, lm, next_tokens(targets, u_len), VOCAB)
    log_probs = (am[:, :, None, :] + lm[:, None, :, :]).log_softmax(-1)  # [B, T, U+1, V+1]
    torch.testing.assert_close(blank, log_probs[..., VOCAB], rtol=1e-4, atol=1e-4)
    for b in range(2):
        for u in range(int(u_len[b])):
            torch.testing.assert_close(emit[b, :, u], log_probs[b, :, u, targets[b, u]], rtol=1e-4, atol=1e-4)


def test_lattice_gradients_are_the_edge_posteriors() -> None:
    g = torch.Generator().manual_seed(4)
    t_len, u_len = torch.tensor([4, 3]), torch.tensor([2, 1])
    blank = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_()
    emit = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_()

    def nll(blank: Tensor, emit: Tensor) -> Tensor:
        return lattice_nll(*mask_lattice(blank, emit, t_len, u_len), t_len, u_len)[0]

    assert torch.autograd.gradcheck(nll, (blank, emit))
    _, occupancy = lattice_nll(*mask_lattice(blank, emit, t_len, u_len), t_len, u_len)
    torch.testing.assert_close(occupancy[:, 0, 0], torch.ones(2, dtype=torch.float64))
    # Every alignment passes each frame's row of nodes at least once: occupancy ≥ 1 per valid frame.
    for b in range(2):
        assert (occupancy[b, : t_len[b]].sum(-1) >= 1 - 1e-9).all()
