"""One emulated accelerator card: program, streams in bounded state memory, batching, timing.

The card behaves like the FPGA card of DESIGN §4, seen from its one client (the transcriber):

- it holds one program; loading another closes every open stream;
- each open stream owns one row of the state memory; opening more streams than the memory holds
  fails with `RESOURCE_EXHAUSTED`;
- a stream has at most one frame in flight, and frames must come in order;
- frames wait until the card is free, then every waiting frame runs as one batch (one frame per
  stream: with one frame per stream per 60 ms, a batch holds the frames of at most one 60 ms
  window), through the program's arithmetic (`ProgramExecutor`) or, in timing-only mode, not at all;
- the timing model turns each batch into simulated cycles. The card keeps a simulated clock: a
  batch starts when its last frame arrived or when the previous batch ends on the card, whichever
  is later, so each frame's simulated latency is what the real card would show under the same
  arrivals. With `paced`, results are released at their simulated completion time (real-time
  behaviour); without, as soon as they are computed.

Thread-safe: the gRPC server calls it from many threads; one batching thread runs the batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram

from gharial.accelerator.executor import CardState, ProgramExecutor
from gharial.accelerator.profile import CardProfile
from gharial.accelerator.program import Program, ProgramInfo
from gharial.accelerator.timing import TimingModel
from gharial.plumbing.logs import log_event

log = logging.getLogger(__name__)

CardMode = Literal["compute", "timing_only"]
BATCH_WINDOW_MS = 60.0
_INITIAL_ROWS = 64  # state-memory rows allocated at program load; more as streams open


class FrameErrorCode(IntEnum):
    """Mirrors `gharial.v1.FrameErrorCode` (protos/accelerator.proto)."""

    NONE = 0
    IN_FLIGHT = 1
    UNKNOWN_STREAM = 2
    BAD_FEATURES = 3
    OUT_OF_ORDER = 4
    NO_PROGRAM = 5
    STREAM_CLOSED = 6


class CardError(Exception):
    """A refused card operation; `code` is the gRPC status name the service answers with."""

    def __init__(self, code: Literal["FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "NOT_FOUND"], message: str):
        super().__init__(message)
        self.code = code


@dataclass
class FrameOutcome:
    """What the card returns for one frame (the service turns it into a FrameResult)."""

    stream_id: int
    frame_index: int
    error: FrameErrorCode = FrameErrorCode.NONE
    message: str = ""
    tokens: list[int] = field(default_factory=list)
    encoder_output: bytes = b""
    batch_id: int = 0
    batch_size: int = 0
    batch_cycles: int = 0
    simulated_latency_ms: float = 0.0


Deliver = Callable[[FrameOutcome], None]


@dataclass
class _Stream:
    row: int
    max_symbols: int  # 0: encoder mode
    next_frame: int = 0
    frames: int = 0
    in_flight: bool = False


@dataclass
class _PendingFrame:
    stream_id: int
    frame_index: int
    features: np.ndarray | None
    reset: bool
    arrival: float  # time.monotonic()
    deliver: Deliver


_LABELS = ["card_id"]
STREAMS_OPEN = Gauge("gharial_card_streams_open", "Streams open on the card", _LABELS)
MAX_STREAMS = Gauge("gharial_card_max_streams", "Streams the card's state memory holds", _LABELS)
STATE_MEMORY_USED = Gauge("gharial_card_state_memory_used_bytes", "State memory in use", _LABELS)
STATE_MEMORY = Gauge("gharial_card_state_memory_bytes", "State memory size", _LABELS)
UTILISATION = Gauge(
    "gharial_card_utilisation", "Fraction of the last second the simulated card was busy", _LABELS
)
BATCHES = Counter("gharial_card_batches_total", "Batches run", _LABELS)
CYCLES = Counter("gharial_card_simulated_cycles_total", "Simulated card cycles", _LABELS)
FRAMES = Counter("gharial_card_frames_total", "Frames by outcome", [*_LABELS, "outcome"])
BATCH_SIZE = Histogram(
    "gharial_card_batch_size",
    "Frames per batch",
    _LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
SIMULATED_LATENCY = Histogram(
    "gharial_card_simulated_latency_seconds",
    "Simulated time from a frame's arrival to its result",
    _LABELS,
    buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.1, 0.25, 1.0),
)
COMPUTE_SECONDS = Histogram(
    "gharial_card_compute_seconds",
    "Wall time the emulator spent computing one batch",
    _LABELS,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


class Card:
    def __init__(
        self,
        card_id: str,
        profile: CardProfile,
        mode: CardMode = "compute",
        paced: bool = False,
        seed: int = 0,
    ) -> None:
        self.card_id = card_id
        self.profile = profile
        self.mode = mode
        self.paced = paced
        self._rng = np.random.default_rng(seed)  # token emissions in timing-only mode
        self._lock = threading.Condition()
        self._program: Program | None = None
        self._info: ProgramInfo | None = None
        self._executor: ProgramExecutor | None = None
        self._timing: TimingModel | None = None
        self._state: CardState | None = None
        self._streams: dict[int, _Stream] = {}
        self._free_rows: list[int] = []  # rows of closed streams, reused first
        self._next_row = 0  # rows below it have been used
        self._pending: list[_PendingFrame] = []
        self._next_stream_id = 1
        self._batch_id = 0
        self._card_free_at = 0.0  # simulated clock, on the time.monotonic() scale
        self._busy: list[tuple[float, float]] = []  # recent simulated (start, end) of batches
        self._closed = False
        self._labels = {"card_id": card_id}
        STATE_MEMORY.labels(**self._labels).set(profile.state_memory_bytes)
        self._update_occupancy()
        self._batcher = threading.Thread(target=self._run_batches, name=f"{card_id}-batcher", daemon=True)
        self._batcher.start()

    # -- program -------------------------------------------------------------------------------

    def load_program(self, data: bytes, where: str = "program") -> ProgramInfo:
        """Validate and load a program (raises ProgramError); closes every open stream."""
        program = Program.from_bytes(data, where=where)
        executor = ProgramExecutor(program) if self.mode == "compute" else None
        timing = TimingModel(self.profile, program.meta.layout)
        with self._lock:
            for stream_id in list(self._streams):
                self._close_locked(stream_id, "a new program was loaded")
            self._program, self._info = program, program.info()
            self._executor, self._timing = executor, timing
            self._state = executor.new_state(_INITIAL_ROWS) if executor is not None else None
            self._free_rows, self._next_row = [], 0
            self._update_occupancy()
        log_event(
            log,
            "program_loaded",
            card_id=self.card_id,
            architecture=self._info.architecture,
            sha256=self._info.program_sha256,
            max_streams=self.max_streams,
        )
        return self._info

    @property
    def program_info(self) -> ProgramInfo | None:
        return self._info

    @property
    def max_streams(self) -> int:
        if self._info is None:
            return 0
        return int(self.profile.state_memory_bytes // self._info.state_bytes_per_stream)

    @property
    def streams_open(self) -> int:
        return len(self._streams)

    @property
    def state_memory_used(self) -> int:
        return 0 if self._info is None else len(self._streams) * self._info.state_bytes_per_stream

    # -- streams -------------------------------------------------------------------------------

    def open_stream(self, max_symbols: int | None = None, encoder_mode: bool = False) -> int:
        """A new stream in start-of-sequence state; `max_symbols` None = the program's default."""
        with self._lock:
            if self._info is None or self._program is None:
                raise CardError("FAILED_PRECONDITION", f"card {self.card_id} has no program loaded")
            if not self._free_rows and self._next_row >= self.max_streams:
                raise CardError(
                    "RESOURCE_EXHAUSTED",
                    f"card {self.card_id} state memory is full: {self.max_streams} streams of "
                    f"{self._info.state_bytes_per_stream} bytes open",
                )
            row = self._free_rows.pop() if self._free_rows else self._take_new_row()
            limit = max_symbols or self._program.meta.layout.max_symbols_per_step
            stream_id = self._next_stream_id
            self._next_stream_id += 1
            self._streams[stream_id] = _Stream(row=row, max_symbols=0 if encoder_mode else limit)
            if self._executor is not None and self._state is not None:
                self._executor.reset(self._state, [row])
            self._update_occupancy()
        log_event(log, "stream_opened", card_id=self.card_id, stream_id=stream_id, row=row)
        return stream_id

    def _take_new_row(self) -> int:
        """A never-used row; the host-side copy of the state memory doubles when it runs out."""
        row, self._next_row = self._next_row, self._next_row + 1
        if self._state is not None and row >= self._state.capacity:
            self._state.grow(min(self.max_streams, 2 * self._state.capacity))
        return row

    def close_stream(self, stream_id: int) -> int:
        """Free a stream's state; its waiting frame (if any) is answered STREAM_CLOSED. → frames run."""
        with self._lock:
            if stream_id not in self._streams:
                raise CardError("NOT_FOUND", f"no open stream {stream_id} on card {self.card_id}")
            return self._close_locked(stream_id, "the stream was closed")

    def _close_locked(self, stream_id: int, why: str) -> int:
        stream = self._streams.pop(stream_id)
        for frame in [f for f in self._pending if f.stream_id == stream_id]:
            self._pending.remove(frame)
            self._reject(frame.deliver, stream_id, frame.frame_index, FrameErrorCode.STREAM_CLOSED, why)
        self._free_rows.append(stream.row)
        self._update_occupancy()
        log_event(log, "stream_closed", card_id=self.card_id, stream_id=stream_id, frames=stream.frames)
        return stream.frames

    # -- frames --------------------------------------------------------------------------------

    def submit(
        self, stream_id: int, frame_index: int, features: bytes, reset: bool, deliver: Deliver
    ) -> None:
        """Queue one frame; `deliver` is called exactly once with its outcome (maybe an error)."""
        with self._lock:
            problem = self._check_frame(stream_id, frame_index, features)
            if problem is not None:
                self._reject(deliver, stream_id, frame_index, *problem)
                return
            stream = self._streams[stream_id]
            stream.in_flight = True
            stream.next_frame += 1
            array = np.frombuffer(features, dtype="<f4") if self.mode == "compute" else None
            self._pending.append(
                _PendingFrame(stream_id, frame_index, array, reset, time.monotonic(), deliver)
            )
            self._lock.notify_all()

    def _check_frame(
        self, stream_id: int, frame_index: int, features: bytes
    ) -> tuple[FrameErrorCode, str] | None:
        if self._info is None:
            return FrameErrorCode.NO_PROGRAM, f"card {self.card_id} has no program loaded"
        stream = self._streams.get(stream_id)
        if stream is None:
            return FrameErrorCode.UNKNOWN_STREAM, f"no open stream {stream_id} on card {self.card_id}"
        if stream.in_flight:
            return FrameErrorCode.IN_FLIGHT, f"stream {stream_id} already has a frame in flight"
        if frame_index != stream.next_frame:
            return (
                FrameErrorCode.OUT_OF_ORDER,
                f"stream {stream_id} expects frame {stream.next_frame}, got {frame_index}",
            )
        if self.mode == "compute":
            expected = 4 * self._info.frame_feature_count
            if len(features) != expected:
                return FrameErrorCode.BAD_FEATURES, f"expected {expected} feature bytes, got {len(features)}"
            if not np.isfinite(np.frombuffer(features, dtype="<f4")).all():
                return FrameErrorCode.BAD_FEATURES, "features contain NaN or infinity"
        return None

    def _reject(
        self, deliver: Deliver, stream_id: int, frame_index: int, code: FrameErrorCode, msg: str
    ) -> None:
        FRAMES.labels(**self._labels, outcome=code.name.lower()).inc()
        deliver(FrameOutcome(stream_id, frame_index, error=code, message=msg))

    # -- batching ------------------------------------------------------------------------------

    def _run_batches(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (
                    not self._pending or (self.paced and time.monotonic() < self._card_free_at)
                ):
                    timeout = max(0.0, self._card_free_at - time.monotonic()) if self._pending else None
                    self._lock.wait(timeout)
                if self._closed:
                    return
                batch, self._pending = self._pending, []
                outcomes, completes_at = self._run_batch_locked(batch)
            if self.paced:
                time.sleep(max(0.0, completes_at - time.monotonic()))
            for frame, outcome in zip(batch, outcomes, strict=True):
                frame.deliver(outcome)

    def _run_batch_locked(self, batch: list[_PendingFrame]) -> tuple[list[FrameOutcome], float]:
        assert self._timing is not None
        streams = [self._streams[f.stream_id] for f in batch]
        rows = [s.row for s in streams]
        started = time.monotonic()
        if self._executor is not None and self._state is not None:
            resets = [s.row for s, f in zip(streams, batch, strict=True) if f.reset]
            if resets:
                self._executor.reset(self._state, resets)
            info = self._info
            assert info is not None
            features = torch.from_numpy(np.stack([f.features for f in batch if f.features is not None]))
            features = features.reshape(len(batch), self._program_features_per_frame(), -1)
            out = self._executor.run_batch(self._state, rows, features, [s.max_symbols for s in streams])
            tokens, joint_evals, predictor_evals = out.tokens, out.joint_evals, out.predictor_evals
            encoder_rows = [out.encoder_output[b].numpy().astype("<f4").tobytes() for b in range(len(batch))]
        else:
            tokens, joint_evals, predictor_evals = self._sampled_decoding(streams)
            encoder_rows = [b"" for _ in batch]
        COMPUTE_SECONDS.labels(**self._labels).observe(time.monotonic() - started)

        timing = self._timing.batch(len(batch), joint_evals, predictor_evals)
        start = max(max(f.arrival for f in batch), self._card_free_at)
        end = start + timing.seconds
        self._card_free_at = end
        self._batch_id += 1
        self._record_busy(start, end)
        BATCHES.labels(**self._labels).inc()
        CYCLES.labels(**self._labels).inc(timing.cycles)
        BATCH_SIZE.labels(**self._labels).observe(len(batch))
        host_s = self.profile.host_overhead_ms / 1000
        outcomes = []
        for frame, stream, frame_tokens, enc in zip(batch, streams, tokens, encoder_rows, strict=True):
            stream.in_flight = False
            stream.frames += 1
            latency = end - frame.arrival + host_s
            SIMULATED_LATENCY.labels(**self._labels).observe(latency)
            FRAMES.labels(**self._labels, outcome="ok").inc()
            outcomes.append(
                FrameOutcome(
                    frame.stream_id,
                    frame.frame_index,
                    tokens=[] if stream.max_symbols == 0 else frame_tokens,
                    encoder_output=enc if stream.max_symbols == 0 else b"",
                    batch_id=self._batch_id,
                    batch_size=len(batch),
                    batch_cycles=timing.cycles,
                    simulated_latency_ms=1000 * latency,
                )
            )
        return outcomes, end + host_s

    def _program_features_per_frame(self) -> int:
        assert self._program is not None
        return self._program.meta.layout.features_per_frame

    def _sampled_decoding(self, streams: list[_Stream]) -> tuple[list[list[int]], int, int]:
        """Timing-only mode: token emissions drawn from the profile's rate (no tokens returned)."""
        rate = self.profile.tokens_per_frame
        emitted = [min(int(self._rng.poisson(rate)), s.max_symbols) for s in streams]
        greedy = [n for n, s in zip(emitted, streams, strict=True) if s.max_symbols > 0]
        joint_evals = sum(n + 1 for n in greedy)
        return [[] for _ in streams], joint_evals, sum(greedy)

    def _record_busy(self, start: float, end: float) -> None:
        self._busy.append((start, end))
        horizon = end - 1.0
        self._busy = [(a, b) for a, b in self._busy if b > horizon]
        busy = sum(b - max(a, horizon) for a, b in self._busy)
        UTILISATION.labels(**self._labels).set(min(1.0, busy))

    def _update_occupancy(self) -> None:
        STREAMS_OPEN.labels(**self._labels).set(len(self._streams))
        MAX_STREAMS.labels(**self._labels).set(self.max_streams)
        STATE_MEMORY_USED.labels(**self._labels).set(self.state_memory_used)

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Answer every waiting frame STREAM_CLOSED, close every stream, stop the batcher."""
        with self._lock:
            for stream_id in list(self._streams):
                self._close_locked(stream_id, f"card {self.card_id} is shutting down")
            self._closed = True
            self._lock.notify_all()
        self._batcher.join(timeout=5)
