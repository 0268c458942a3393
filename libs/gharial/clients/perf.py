"""The performance client (spec: "Testing Inference Performance"): many concurrent real-time
streams on one asyncio loop, with the latency of every 60 ms frame.

The gateway answers every 60 ms of audio with one response, in order, so response k belongs to
frame k: the latency of a frame is the time from sending it to receiving response k. Frames are
cut and zero-padded to whole 60 ms once, before any stream starts (the gateway pads the tail with
zeros too, so transcripts do not change), and shared by every connection; each connection starts
at a random offset within one frame, as independent clients would. The client measures its own
event-loop lag and CPU use, so a report shows whether the client kept up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from gharial.audio import float_to_pcm16, load_audio
from gharial.gateway.framing import FRAME_BYTES, FRAME_SECONDS
from gharial.gateway.messages import STREAM_PATH, SUBPROTOCOL, StreamResponse
from gharial.gateway.params import DEFAULT_CONTENT_TYPE, SAMPLE_RATE
from gharial.plumbing.memory import freeze_startup_objects

# How often the loop-lag probe wakes: lag is how late it wakes.
_PROBE_SECONDS = 0.01


class Stats(BaseModel):
    """Percentiles of a set of durations, in milliseconds (None when there are no samples)."""

    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, seconds: array[float]) -> Stats:
        if not seconds:
            return cls(count=0, p50_ms=None, p90_ms=None, p99_ms=None, max_ms=None)
        ms = np.frombuffer(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (round(float(v), 2) for v in np.percentile(ms, [50, 90, 99]))
        return cls(count=len(ms), p50_ms=p50, p90_ms=p90, p99_ms=p99, max_ms=round(float(ms.max()), 2))


class Transcript(BaseModel):
    connection: int
    file: str
    transcript: str


class PerfReport(BaseModel):
    """What `gharial perf --json` prints."""

    connections: int
    perpetual: bool
    seconds: float
    utterances_completed: int
    frames_sent: int
    dropped_responses: int
    latency: Stats
    streams_held: int
    errors: int
    error_reasons: dict[str, int]
    loop_lag: Stats
    client_cpu_percent: float
    transcripts: list[Transcript]


@dataclass
class Audio:
    """One input, pre-cut into whole 60 ms frames of 16 kHz S16LE."""

    path: Path
    frames: list[bytes]

    @classmethod
    def load(cls, path: Path) -> Audio:
        pcm = float_to_pcm16(load_audio(path, SAMPLE_RATE))
        pcm += bytes(-len(pcm) % FRAME_BYTES)
        return cls(path, [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)])


@dataclass
class PerfConfig:
    host: str = "localhost"
    port: int = 3030
    connections: int = 1
    perpetual: bool = False
    duration: float | None = None
    connect_timeout: float = 15.0
    max_latency: float = 1.0
    transcripts: bool = True


@dataclass
class _Totals:
    """Shared by every connection; latencies are one float per frame in a flat array."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    frames_sent: int = 0
    dropped: int = 0
    utterances: int = 0
    held: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    transcripts: list[Transcript] = field(default_factory=list)

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


class _Utterance:
    """One websocket stream of one input: the sender paces frames on the wall clock."""

    def __init__(self, ws: ClientConnection, audio: Audio, stop: asyncio.Event, parse: bool) -> None:
        self.ws = ws
        self.audio = audio
        self.stop = stop
        self.parse = parse
        self.sent_at = array("d", bytes(8 * len(audio.frames)))
        self.sent = 0
        self.on_schedule = True
        self.text: list[str] = []

    async def send(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        send = self.ws.send
        try:
            for i, frame in enumerate(self.audio.frames):
                due = start + i * FRAME_SECONDS
                now = loop.time()
                if now < due:
                    await asyncio.sleep(due - now)
                    now = loop.time()
                elif now - due > FRAME_SECONDS:
                    self.on_schedule = False
                if self.stop.is_set():
                    break
                self.sent_at[i] = now
                self.sent = i + 1
                await send(frame)
            await send(b"")
        except ConnectionClosed:
            pass  # the server closed first; the receiver reports why

    async def receive(self, latencies: array[float]) -> tuple[int, float]:
        """Receives until the Close: (responses matched to sent frames, worst latency in s)."""
        loop = asyncio.get_running_loop()
        received = 0
        worst = 0.0
        try:
            async for message in self.ws:
                now = loop.time()
                if received < self.sent:
                    latency = now - self.sent_at[received]
                    latencies.append(latency)
                    worst = max(worst, latency)
                    received += 1
                if self.parse:
                    response = StreamResponse.model_validate_json(message)
                    if not response.is_provisional and response.alternatives:
                        self.text.append(response.alternatives[0].transcript)
        except ConnectionClosed:
            pass  # an error close: the caller reads the code
        return received, worst


async def _connection(
    index: int, inputs: list[Audio], config: PerfConfig, uri: str, stop: asyncio.Event, totals: _Totals
) -> None:
    """Streams utterances (once, or in a loop with `perpetual`) until done, stopped or failed."""
    await asyncio.sleep(random.uniform(0.0, FRAME_SECONDS))
    held = True
    turn = 0
    while not stop.is_set():
        audio = inputs[(index + turn) % len(inputs)]
        try:
            ws = await connect(
                uri, subprotocols=[Subprotocol(SUBPROTOCOL)], open_timeout=config.connect_timeout
            )
        except (OSError, InvalidHandshake, TimeoutError) as err:
            totals.error(f"connect: {type(err).__name__}: {err}")
            held = False
            break
        utterance = _Utterance(ws, audio, stop, parse=config.transcripts and turn == 0)
        sender = asyncio.create_task(utterance.send())
        received, worst = await utterance.receive(totals.latencies)
        await sender
        await ws.wait_closed()
        totals.frames_sent += utterance.sent
        totals.dropped += utterance.sent - received
        code = ws.close_code
        if code != 1000:
            totals.error(f"{code} {ws.close_reason}".strip())
        held = held and code == 1000 and received == utterance.sent and utterance.on_schedule
        held = held and worst <= config.max_latency
        if code != 1000:
            break
        if utterance.sent == len(audio.frames):
            totals.utterances += 1
            if turn == 0 and config.transcripts:
                text = "".join(utterance.text).strip()
                totals.transcripts.append(Transcript(connection=index, file=str(audio.path), transcript=text))
        turn += 1
        if not config.perpetual:
            break
    totals.held += held


async def _probe_lag(stop: asyncio.Event, lags: array[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + _PROBE_SECONDS
        await asyncio.sleep(_PROBE_SECONDS)
        lags.append(max(0.0, loop.time() - due))


async def run_perf(inputs: list[Audio], config: PerfConfig) -> PerfReport:
    """Drives `config.connections` streams over `inputs` and reports; SIGINT ends the run early
    (streams send end of stream and are waited for, so the report stays exact)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    if config.duration is not None:
        loop.call_later(config.duration, stop.set)
    query = urlencode({"content_type": DEFAULT_CONTENT_TYPE})
    uri = f"ws://{config.host}:{config.port}{STREAM_PATH}?{query}"
    totals = _Totals()
    lags: array[float] = array("d")
    probe = asyncio.create_task(_probe_lag(stop, lags))
    # The client's own full collections would stall every stream at once and show up as latency.
    freeze_startup_objects()
    started, cpu_started = time.monotonic(), time.process_time()
    try:
        await asyncio.gather(
            *(_connection(i, inputs, config, uri, stop, totals) for i in range(config.connections))
        )
    finally:
        stop.set()
        await probe
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    seconds = time.monotonic() - started
    return PerfReport(
        connections=config.connections,
        perpetual=config.perpetual,
        seconds=round(seconds, 3),
        utterances_completed=totals.utterances,
        frames_sent=totals.frames_sent,
        dropped_responses=totals.dropped,
        latency=Stats.of(totals.latencies),
        streams_held=totals.held,
        errors=sum(totals.errors.values()),
        error_reasons=totals.errors,
        loop_lag=Stats.of(lags),
        client_cpu_percent=round(100.0 * (time.process_time() - cpu_started) / max(seconds, 1e-9), 1),
        transcripts=sorted(totals.transcripts, key=lambda t: t.connection),
    )
