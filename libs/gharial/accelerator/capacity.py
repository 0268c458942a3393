"""Capacity study: how many real-time streams a card serves at p99 frame latency <= 25 ms.

A discrete-event simulation in timing-only mode (no arithmetic): each stream sends one 60 ms frame
every 60 ms, at a random phase (seeded) with a little jitter. Streams are spread over the cards as
the Redis load balancer does (least loaded first, so the counts differ by at most one) and every
card runs on its own: whenever it is idle and frames are waiting, it starts one batch of all of them
(a stream has at most one frame in flight: a later frame waits for the one before), and the batch
takes what the timing model says. A frame's latency is the batch's end minus the frame's arrival,
plus the host's per-frame overhead.

Decoding work is drawn, not computed: each frame emits Poisson(`tokens_per_frame`) tokens (capped at
the program's max symbols per step), so a batch runs 1 + (most tokens of any of its frames) greedy
rounds, frames + tokens joint evaluations and tokens prediction-network evaluations. With beam width
k the card evaluates the joint and the prediction network for k hypotheses per stream per round
(k times the evaluations, same rounds) and keeps k copies of the prediction-network state per
stream; beam search's host-side work and any extra rounds are not modelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from gharial.accelerator.timing import TimingModel
from gharial.asr.config import FRAME_MS

FRAME_S = FRAME_MS / 1000
LATENCY_TARGET_MS = 25.0  # CAIMAN-ASR's p99 frame latency at max real-time streams (DESIGN §9)
LOW_LOAD_STREAMS = 32  # CAIMAN-ASR quotes p99 latency at this load too (15 ms)


class StudyPoint(BaseModel):
    """The simulation of one stream count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    streams: int
    cards: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_batch: float  # frames per batch
    utilisation: float  # busy fraction of the cards' time (fixed overheads keep even light loads busy)
    backlog: int  # frames still waiting when the simulation gave up (0: the cards kept up)
    keeps_up: bool  # p99 <= 25 ms and no backlog


class CapacityStudy(BaseModel):
    """A sweep of stream counts and the largest that keeps up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    profile: str
    cards: int
    beam: int
    seconds: float
    seed: int
    max_rts: int  # 0 if not even one stream per card keeps up
    p99_ms_at_max: float | None
    p99_ms_at_32: float | None  # None if 32 streams do not fit in the cards' state memory
    sweep: list[StudyPoint]


def simulate(
    timing: TimingModel,
    streams: int,
    cards: int = 1,
    *,
    seconds: float = 10.0,
    seed: int = 0,
    beam: int = 1,
    jitter_ms: float = 1.0,
) -> StudyPoint:
    """`streams` real-time streams on `cards` cards for `seconds` of audio."""
    per_card = [streams // cards + (card < streams % cards) for card in range(cards)]
    if per_card[0] > timing.max_streams(beam):
        raise ValueError(
            f"{per_card[0]} streams per card exceed the state memory's {timing.max_streams(beam)}"
        )
    frames = max(1, round(seconds / FRAME_S))
    latencies, batches, busy, span, backlog = [], [], 0.0, 0.0, 0
    for card, n in enumerate(per_card):
        if n:
            rng = np.random.default_rng([seed, card])
            run = _simulate_card(timing, n, frames, rng, beam, jitter_ms / 1000)
            latencies.append(run.latencies)
            batches += run.batches
            busy += run.busy
            span += run.span
            backlog += run.backlog
    lat_ms = 1e3 * np.concatenate(latencies) + timing.profile.host_overhead_ms
    p99 = float(np.percentile(lat_ms, 99))
    return StudyPoint(
        streams=streams,
        cards=cards,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=p99,
        max_ms=float(lat_ms.max()),
        mean_batch=float(np.mean(batches)),
        utilisation=busy / span,
        backlog=backlog,
        keeps_up=p99 <= LATENCY_TARGET_MS and backlog == 0,
    )


@dataclass
class _CardRun:
    latencies: np.ndarray  # seconds, without the host overhead
    batches: list[int]  # frames per batch
    busy: float  # seconds spent running batches
    span: float  # seconds from the start to the end of the last batch
    backlog: int  # frames never run


def _simulate_card(
    timing: TimingModel, n: int, frames: int, rng: np.random.Generator, beam: int, jitter_s: float
) -> _CardRun:
    """One card's `n` streams for `frames` frames each: batches back to back, all waiting frames each."""
    jitter = np.clip(rng.normal(0.0, jitter_s, (n, frames)), -FRAME_S / 4, FRAME_S / 4) if jitter_s else 0.0
    arrivals = rng.uniform(0.0, FRAME_S, (n, 1)) + FRAME_S * np.arange(frames) + jitter
    tokens = np.minimum(
        rng.poisson(timing.profile.tokens_per_frame, (n, frames)), timing.layout.max_symbols_per_step
    )
    give_up = arrivals.max() + FRAME_S  # a card still busy a frame after the last arrival fell behind
    latencies = np.full((n, frames), np.nan)
    nxt = np.zeros(n, dtype=int)  # each stream's oldest frame not yet run
    waiting = arrivals[:, 0].copy()  # its arrival time (inf once all have run)
    free_at, busy, batches = 0.0, 0.0, []
    while (first := waiting.min()) < np.inf:
        start = max(free_at, first)
        if start > give_up:
            break
        ready = np.flatnonzero(waiting <= start)
        k = nxt[ready]
        emitted = tokens[ready, k]
        evals, tok = len(ready), int(emitted.sum())
        duration = timing.batch(
            evals, beam * (evals + tok), beam * tok, rounds=1 + int(emitted.max())
        ).seconds
        free_at = start + duration
        latencies[ready, k] = free_at - waiting[ready]
        busy += duration
        batches.append(evals)
        nxt[ready] += 1
        done = nxt[ready] >= frames
        waiting[ready] = np.where(done, np.inf, arrivals[ready, np.minimum(nxt[ready], frames - 1)])
    unrun = np.isnan(latencies)
    latencies[unrun] = start - arrivals[unrun]  # frames left waiting: at least this late
    return _CardRun(latencies.ravel(), batches, busy, max(free_at, frames * FRAME_S), int(unrun.sum()))


def max_rts(
    timing: TimingModel,
    cards: int = 1,
    *,
    seconds: float = 10.0,
    seed: int = 0,
    beam: int = 1,
    resolution: float = 0.01,
    on_point: Callable[[StudyPoint], None] | None = None,
) -> StudyPoint | None:
    """The point at the most streams that keep up, to within `resolution` (relative), by bisection
    (latency grows with load); None if not even one stream per card keeps up."""

    def run(streams: int) -> StudyPoint:
        point = simulate(timing, streams, cards, seconds=seconds, seed=seed, beam=beam)
        if on_point:
            on_point(point)
        return point

    limit = cards * timing.max_streams(beam)
    if limit < cards or not (best := run(cards)).keeps_up:
        return None
    hi = min(limit, cards * _throughput_bound(timing, beam))
    while (point := run(hi)).keeps_up:  # the bound is an estimate: make sure `hi` is too many
        best = point
        if hi == limit:
            return best
        hi = min(limit, 2 * hi)
    lo = best.streams
    while hi - lo > max(1, resolution * lo):
        mid = (lo + hi) // 2
        point = run(mid)
        if point.keeps_up:
            best, lo = point, mid
        else:
            hi = mid
    return best


def _throughput_bound(timing: TimingModel, beam: int) -> int:
    """Streams per card whose frames alone would keep the card busy all the time, at the marginal
    cost of a frame in large batches."""
    big = 4096
    tokens = round(timing.profile.tokens_per_frame * big)
    per_frame = (
        timing.batch(2 * big, beam * 2 * (big + tokens), beam * 2 * tokens).seconds
        - timing.batch(big, beam * (big + tokens), beam * tokens).seconds
    ) / big
    return int(FRAME_S / per_frame) + 1


def study(
    timing: TimingModel,
    model: str,
    cards: int = 1,
    *,
    seconds: float = 10.0,
    seed: int = 0,
    beam: int = 1,
    resolution: float = 0.01,
    on_point: Callable[[StudyPoint], None] | None = None,
) -> CapacityStudy:
    """Max real-time streams, and a sweep from 32 streams to past the maximum."""
    best = max_rts(
        timing, cards, seconds=seconds, seed=seed, beam=beam, resolution=resolution, on_point=on_point
    )
    top = best.streams if best else 0
    limit = cards * timing.max_streams(beam)
    counts = {LOW_LOAD_STREAMS, *(round(f * top) for f in (0.25, 0.5, 0.75, 0.9, 1.1))}
    points = {best.streams: best} if best else {}
    for streams in sorted(n for n in counts - points.keys() if 0 < n <= limit):
        points[streams] = simulate(timing, streams, cards, seconds=seconds, seed=seed, beam=beam)
        if on_point:
            on_point(points[streams])
    sweep = [points[n] for n in sorted(points)]
    low = points.get(LOW_LOAD_STREAMS)
    return CapacityStudy(
        model=model,
        profile=timing.profile.name,
        cards=cards,
        beam=beam,
        seconds=seconds,
        seed=seed,
        max_rts=top,
        p99_ms_at_max=best.p99_ms if best else None,
        p99_ms_at_32=low.p99_ms if low else None,
        sweep=sweep,
    )
