"""The order training sees its data: a pure function of (seed, epoch), so a resumed run continues
with exactly the batches it would have seen."""

from __future__ import annotations

import random

BUCKET_BATCHES = 32  # batches drawn together and sorted by length: less padding, still random


def epoch_batches(durations: list[float], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch. Utterances are shuffled, grouped into buckets of
    `BUCKET_BATCHES` batches, sorted by duration inside a bucket and cut into batches; batches are
    then shuffled. Only full batches are returned (the remainder waits for another epoch)."""
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(durations)))
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: durations[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def batch_at(durations: list[float], batch_size: int, seed: int, position: int) -> list[int]:
    """The `position`-th batch since the start of training (epochs follow each other)."""
    n, bucket = len(durations), batch_size * BUCKET_BATCHES
    per_epoch = n // bucket * BUCKET_BATCHES + n % bucket // batch_size  # as epoch_batches cuts them
    if per_epoch == 0:
        raise ValueError(f"{len(durations)} utterances cannot fill one batch of {batch_size}")
    epoch, index = divmod(position, per_epoch)
    return epoch_batches(durations, batch_size, seed, epoch)[index]
