"""RNN-T loss against references that cannot share its bugs: every alignment summed explicitly, and a
plain log_softmax + Python-loop forward recursion differentiated by autograd."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gharial.asr.loss import rnnt_loss


def brute_force(logits: Tensor, targets: Tensor, t_len: int, u_len: int, blank_id: int) -> Tensor:
    """-log P(y | x) of one utterance (logits [T, U+1, V+1]) by enumerating every alignment."""
    lp = logits.log_softmax(-1)
    paths = []
    for emits in itertools.combinations(range(t_len - 1 + u_len), u_len):
        t = u = 0
        score = lp.new_zeros(())
        for step in range(t_len - 1 + u_len):
            if step in emits:
                score = score + lp[t, u, targets[u]]
                u += 1
            else:
                score = score + lp[t, u, blank_id]
                t += 1
        paths.append(score + lp[t_len - 1, u_len, blank_id])  # every alignment ends with a blank
    return -torch.logsumexp(torch.stack(paths), 0)


def loop_reference(logits: Tensor, targets: Tensor, t_len: int, u_len: int, blank_id: int) -> Tensor:
    """-log P(y | x) of one utterance by the textbook alpha recursion, one node at a time."""
    lp = logits.log_softmax(-1)
    alpha: dict[tuple[int, int], Tensor] = {(0, 0): lp.new_zeros(())}
    for t in range(t_len):
        for u in range(u_len + 1):
            terms = []
            if t > 0:
                terms.append(alpha[t - 1, u] + lp[t - 1, u, blank_id])
            if u > 0:
                terms.append(alpha[t, u - 1] + lp[t, u - 1, targets[u - 1]])
            if terms:
                alpha[t, u] = torch.logsumexp(torch.stack(terms), 0)
    return -(alpha[t_len - 1, u_len] + lp[t_len - 1, u_len, blank_id])


def random_case(
    t_lens: list[int], u_lens: list[int], vocab: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random logits [B, max T, max U + 1, vocab + 1] and targets (padding included) for given lengths."""
    g = torch.Generator().manual_seed(seed)
    b, t, u = len(t_lens), max(t_lens), max(u_lens)
    logits = torch.randn(b, t, u + 1, vocab + 1, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, vocab, (b, u), generator=g)
    return logits, targets, torch.tensor(t_lens), torch.tensor(u_lens)


CASES = [
    ([1], [0], 1),  # T=1, empty target: the only alignment is one blank
    ([1], [3], 4),  # T=1: all tokens emitted from the first frame
    ([4], [0], 3),  # empty target
    ([3], [2], 2),
    ([5], [3], 4),
    ([4, 2, 1, 3], [3, 0, 2, 1], 5),  # variable lengths within a batch
    ([2, 5, 3], [4, 2, 0], 3),
]


@pytest.mark.parametrize(("t_lens", "u_lens", "vocab"), CASES)
@pytest.mark.parametrize("blank_last", [True, False])
def test_matches_sum_over_all_alignments(t_lens: list[int], u_lens: list[int], vocab: int, blank_last: bool):
    logits, targets, t_len, u_len = random_case(t_lens, u_lens, vocab, seed=len(t_lens) + vocab)
    blank_id = vocab if blank_last else 0
    if not blank_last:
        targets = targets + 1  # tokens are then 1..V
    got = rnnt_loss(logits, targets, t_len, u_len, blank_id, reduction="none")
    want = torch.stack(
        [brute_force(logits[i], targets[i], t_lens[i], u_lens[i], blank_id) for i in range(len(t_lens))]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("t_lens", "u_lens", "vocab"), [([1], [0], 1), ([2, 3], [2, 0], 2), ([3, 1, 2], [1, 2, 0], 3)]
)
def test_gradcheck(t_lens: list[int], u_lens: list[int], vocab: int):
    logits, targets, t_len, u_len = random_case(t_lens, u_lens, vocab, seed=7)
    logits.requires_grad_()
    weights = torch.linspace(0.5, 2.0, len(t_lens), dtype=torch.float64)  # exercises grad_out per utterance

    def f(x: Tensor) -> Tensor:
        return (rnnt_loss(x, targets, t_len, u_len, vocab, reduction="none") * weights).sum()

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize(
    ("t_lens", "u_lens", "vocab", "reference"),
    [
        ([4, 2, 1, 3], [3, 0, 2, 1], 5, brute_force),
        ([12, 7, 1, 9], [6, 3, 4, 0], 6, loop_reference),
    ],
)
def test_gradient_matches_autograd_reference(t_lens, u_lens, vocab, reference):
    logits, targets, t_len, u_len = random_case(t_lens, u_lens, vocab, seed=3)
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = rnnt_loss(mine, targets, t_len, u_len, vocab, reduction="sum")
    want = sum(reference(ref[i], targets[i], t_lens[i], u_lens[i], vocab) for i in range(len(t_lens)))
    assert isinstance(want, Tensor)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    assert mine.grad is not None and ref.grad is not None
    torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=1e-6)


def test_reductions():
    logits, targets, t_len, u_len = random_case([4, 2, 3], [3, 0, 1], 4, seed=11)
    none = rnnt_loss(logits, targets, t_len, u_len, 4, reduction="none")
    assert none.shape == (3,)
    torch.testing.assert_close(rnnt_loss(logits, targets, t_len, u_len, 4, reduction="sum"), none.sum())
    torch.testing.assert_close(rnnt_loss(logits, targets, t_len, u_len, 4, reduction="mean"), none.mean())
    torch.testing.assert_close(rnnt_loss(logits, targets, t_len, u_len, 4), none.mean())  # mean by default
    with pytest.raises(ValueError):
        rnnt_loss(logits, targets, t_len, u_len, 4, reduction="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rnnt_loss(logits, targets[:, :-1], t_len, u_len, 4)


@st.composite
def padded_batches(draw: st.DrawFn) -> dict:
    b = draw(st.integers(1, 3))
    return {
        "t_lens": draw(st.lists(st.integers(1, 4), min_size=b, max_size=b)),
        "u_lens": draw(st.lists(st.integers(0, 3), min_size=b, max_size=b)),
        "vocab": draw(st.integers(1, 4)),
        "extra_t": draw(st.integers(0, 2)),
        "extra_u": draw(st.integers(0, 2)),
        "garbage": draw(st.sampled_from([0.0, 100.0, float("inf"), float("nan")])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(deadline=None, max_examples=25)
@given(padded_batches())
def test_invariant_to_padding(case: dict):
    """Each utterance alone at its exact size vs batched, with garbage frames/tokens past its lengths."""
    t_lens, u_lens, vocab = case["t_lens"], case["u_lens"], case["vocab"]
    b, t, u = len(t_lens), max(t_lens) + case["extra_t"], max(u_lens) + case["extra_u"]
    g = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(b, t, u + 1, vocab + 1, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (b, u), generator=g)
    for i in range(b):  # garbage past the lengths: huge or non-finite logits, out-of-range target ids
        logits[i, t_lens[i] :] = case["garbage"]
        logits[i, :, u_lens[i] + 1 :] = case["garbage"]
        targets[i, u_lens[i] :] = torch.randint(-5, 1000, (u - u_lens[i],), generator=g)
    logits.requires_grad_()
    batched = rnnt_loss(logits, targets, torch.tensor(t_lens), torch.tensor(u_lens), vocab, reduction="none")
    batched.sum().backward()
    assert logits.grad is not None
    for i in range(b):
        alone = logits[i : i + 1, : t_lens[i], : u_lens[i] + 1].detach().clone().requires_grad_()
        loss = rnnt_loss(
            alone,
            targets[i : i + 1, : u_lens[i]],
            torch.tensor(t_lens[i : i + 1]),
            torch.tensor(u_lens[i : i + 1]),
            vocab,
        )
        loss.backward()
        assert alone.grad is not None
        torch.testing.assert_close(batched[i], loss.detach(), rtol=0, atol=1e-12)
        grad = logits.grad[i]
        torch.testing.assert_close(grad[: t_lens[i], : u_lens[i] + 1], alone.grad[0], rtol=0, atol=1e-12)
        assert grad[t_lens[i] :].eq(0).all() and grad[:, u_lens[i] + 1 :].eq(0).all()


def test_bigger_case_is_finite_and_fast():
    b, t, u, v = 4, 50, 20, 30
    logits, targets, t_len, u_len = random_case(
        [t, 41, 50, 17], [u, 20, 3, 9], v, seed=5, dtype=torch.float32
    )
    logits.requires_grad_()
    start = time.perf_counter()
    loss = rnnt_loss(logits, targets, t_len, u_len, v)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert logits.grad is not None
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[:, :17, :4].abs().sum() > 0
    assert elapsed < 2.0, f"forward + backward took {elapsed:.2f} s"
    # float32 agrees with float64; the gradient of each frame's softmax sums to zero over V.
    loss64 = rnnt_loss(logits.detach().double(), targets, t_len, u_len, v)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(b, t, u + 1), rtol=0, atol=1e-5)


def test_low_precision_logits():
    logits, targets, t_len, u_len = random_case([6, 4], [3, 2], 8, seed=2, dtype=torch.float32)
    half = logits.bfloat16().requires_grad_()
    loss = rnnt_loss(half, targets, t_len, u_len, 8)
    loss.backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(
        loss.float(), rnnt_loss(logits.bfloat16().float(), targets, t_len, u_len, 8), rtol=1e-2, atol=0
    )
