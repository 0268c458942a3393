"""BatchCache: reuse of the last step's batch, by identity of the rows it was split into."""

from __future__ import annotations

import torch

from gharial.asr.batch_cache import BatchCache
from gharial.asr.model import LSTMState


def counting_cache() -> tuple[BatchCache[LSTMState, LSTMState], list[int]]:
    cats: list[int] = []

    def cat(rows: list[LSTMState]) -> LSTMState:
        cats.append(len(rows))
        return LSTMState.cat(rows)

    return BatchCache(cat, LSTMState.split, LSTMState.select), cats


def states(n: int) -> list[LSTMState]:
    return [LSTMState(torch.full((2, 1, 3), float(i)), torch.full((2, 1, 3), -float(i))) for i in range(n)]


def test_rows_of_the_last_split_in_order_reuse_the_batch() -> None:
    cache, cats = counting_cache()
    batch = cache.gather(states(4))
    rows = cache.split(batch)
    assert cache.gather(rows) is batch
    assert cats == [4]


def test_reordered_or_fewer_rows_are_gathered_from_the_batch() -> None:
    cache, cats = counting_cache()
    rows = cache.split(cache.gather(states(4)))
    order = [rows[2], rows[0], rows[3]]
    gathered = cache.gather(order)
    torch.testing.assert_close(gathered.h, LSTMState.cat(order).h, rtol=0, atol=0)
    torch.testing.assert_close(gathered.c, LSTMState.cat(order).c, rtol=0, atol=0)
    assert cats == [4]  # no second concatenation


def test_a_new_row_means_concatenation() -> None:
    cache, cats = counting_cache()
    rows = cache.split(cache.gather(states(3)))
    fresh = states(5)[4]
    gathered = cache.gather([rows[1], fresh])
    assert cats == [3, 2]
    assert gathered.h[:, :, 0].tolist() == [[1.0, 4.0], [1.0, 4.0]]


def test_an_equal_but_different_row_is_not_mistaken_for_a_cached_one() -> None:
    """Identity, not equality: a stream whose state was replaced by an equal tensor is re-read."""
    cache, cats = counting_cache()
    rows = cache.split(cache.gather(states(2)))
    twin = LSTMState(rows[0].h.clone(), rows[0].c.clone())
    cache.gather([twin, rows[1]])
    assert cats == [2, 2]
