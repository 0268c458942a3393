"""Reuse the last step's batched state instead of concatenating per-stream states anew.

A batched streaming step concatenates every stream's state into one batch, runs the model on it
and splits the new batch back into one state per stream (views of the batch). On a live server
the next step asks for the same streams' states, which are exactly those views. Concatenating
them again costs one small copy per stream and tensor; gathering them from the batch they are
views of costs one indexing per tensor, and nothing when the rows come in the same order as last
time. Measured in one process on 2 cores (session 11): the bundled en-small's step at 64 streams
9.28 → 8.88 ms (4%), at 128 streams 13.76 → 13.45 ms; for base (0.6 ms of encoder-state
concatenation in a ~60 ms step) the difference is lost in the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

Row = TypeVar("Row")
Batch = TypeVar("Batch")


class BatchCache(Generic[Row, Batch]):
    """Batches rows with `cat`, unless every row is one that the last `split` handed out: then the
    batch those rows came from is reused (`select`ed by row index when the order differs).

    Rows are matched by identity, so a row object that was replaced (a stream's new state after a
    reset) is concatenated as usual. The cache keeps the last batch and its rows alive, which
    also keeps their ids unique. Batch, rows and their index are stored as one attribute, so that
    threads sharing a decoder never see one step's batch with another step's rows.

    A batch reused as it is may be written in place by the caller (the greedy decoder updates the
    projections of emitting rows): that is safe because the rows handed out are views of it and
    are replaced by the next `split` of the same batch."""

    def __init__(
        self,
        cat: Callable[[list[Row]], Batch],
        split: Callable[[Batch], list[Row]],
        select: Callable[[Batch, Tensor], Batch],
    ) -> None:
        self._cat, self._split, self._select = cat, split, select
        self._last: tuple[Batch, list[Row], dict[int, int]] | None = None

    def gather(self, rows: Sequence[Row]) -> Batch:
        """One batch of `rows`, row i of the batch being rows[i]."""
        last = self._last
        if last is not None:
            batch, cached_rows, index_of = last
            indices = [index_of.get(id(row), -1) for row in rows]
            if -1 not in indices:
                if indices == list(range(len(cached_rows))):
                    return batch
                return self._select(batch, torch.tensor(indices))
        return self._cat(list(rows))

    def split(self, batch: Batch) -> list[Row]:
        """One row per batch row (what `split` makes of it), remembered for the next `gather`."""
        rows = self._split(batch)
        self._last = (batch, rows, {id(row): i for i, row in enumerate(rows)})
        return rows
