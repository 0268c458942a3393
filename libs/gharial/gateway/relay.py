"""One websocket stream ↔ one gRPC Transcribe call, moved to another worker when its worker fails.

No transcript is lost when a worker dies. Final responses are never revised, so all a worker needs
to continue a stream is the audio since the last final response: the relay keeps those frames. When
the call fails (the worker died, is draining, or any status but INVALID_ARGUMENT), it claims another
worker, replays the kept frames on a new call with `StreamConfig.first_frame` = the first replayed
frame (so response times continue the stream's timeline), drops the replayed responses whose frames
the client already has a response for, and goes on: the client sees a delay, not an error or a gap.
A final response among the dropped ones carries text the client lacks: it is joined to the next
response sent, which becomes final (that frame's provisional update is skipped).

Bounds, each `window` frames (`--replay-window-s`, 60 s by default):
- unanswered frames: beyond it the client's frames wait (backpressure through TCP);
- answered frames not yet covered by a final response: beyond it the oldest are dropped. Should the
  worker then fail, the next one starts after them, and the text of that audio which was not final
  yet is lost (counted in `gharial_gateway_replay_frames_dropped`). Transcribers finalise at
  endpoints and at every state reset (15 s), so normal speech never fills the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from gharial.gateway.channels import Channels
from gharial.gateway.closing import bad_request, unavailable
from gharial.gateway.messages import Alternative, StreamResponse
from gharial.gateway.metrics import (
    FRAME_LATENCY,
    REPLAY_FRAMES_DROPPED,
    REPLAYED_FRAMES,
    REPLAYS,
    RESPONSES,
)
from gharial.gateway.workers import NoWorker, UnknownModel, Workers
from gharial.plumbing.logs import log_event
from gharial.protos import transcriber_pb2, transcriber_pb2_grpc

log = logging.getLogger(__name__)

Send = Callable[[StreamResponse], Awaitable[None]]

# Retries of a failing stream: at once (the next worker), then growing pauses up to a second.
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 1.0


@dataclass(frozen=True)
class _Frame:
    audio: bytes
    complete_at: float  # time.monotonic() when the frame was complete at the gateway


class _CallFailed(Exception):
    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details


def to_message(response: transcriber_pb2.TranscribeResponse) -> StreamResponse:
    return StreamResponse(
        start=response.start,
        end=response.end,
        is_provisional=response.is_provisional,
        alternatives=[
            Alternative(transcript=a.transcript, confidence=a.confidence) for a in response.alternatives
        ],
    )


def joined_finals(finals: list[transcriber_pb2.TranscribeResponse], end: float) -> StreamResponse:
    """One final response with the text of `finals` in order, spanning them through `end`.
    Alternative i joins each response's alternative i (or its last, when it has fewer)."""
    parts = [f.alternatives for f in finals if f.alternatives]
    width = max((len(alternatives) for alternatives in parts), default=0)
    joined = []
    for i in range(width):
        picked = [alternatives[min(i, len(alternatives) - 1)] for alternatives in parts]
        joined.append(
            Alternative(
                transcript="".join(a.transcript for a in picked), confidence=min(a.confidence for a in picked)
            )
        )
    return StreamResponse(start=finals[0].start, end=end, is_provisional=False, alternatives=joined)


class Relay:
    """Feed it the stream's 60 ms frames (`feed`, then `end`) while `run` relays them to workers and
    their responses to `send`, one per frame and one after end of stream."""

    def __init__(
        self,
        stream_id: str,
        config: transcriber_pb2.StreamConfig,
        workers: Workers,
        channels: Channels,
        send: Send,
        window: int,
        failover_timeout_s: float,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least one frame, got {window}")
        self.stream_id = stream_id
        self._config = config
        self._workers = workers
        self._channels = channels
        self._send = send
        self._window = window
        self._failover_timeout_s = failover_timeout_s
        self._failed_workers: set[str] = (
            set()
        )  # addresses whose call broke; claimed again only as a last resort
        # Frames not yet covered by a final response; the first has index `_kept_start`.
        self._kept: deque[_Frame] = deque()
        self._kept_start = 0
        self._ended_at: float | None = None
        # Responses sent to the client; the next one is for frame `_delivered`.
        self._delivered = 0
        # Final responses dropped during a replay, whose text goes out with the next response.
        self._pending_finals: list[transcriber_pb2.TranscribeResponse] = []
        # Whether final text has come for the client: a replay's text then starts with a space.
        self._has_text = False
        self._arrived = asyncio.Event()
        self._answered = asyncio.Event()

    @property
    def frames(self) -> int:
        """Frames received so far."""
        return self._kept_start + len(self._kept)

    @property
    def finished(self) -> bool:
        """The response to end of stream has been sent."""
        return self._ended_at is not None and self._delivered > self.frames

    async def feed(self, audio: bytes) -> None:
        """Queue one 60 ms frame; waits while `window` frames are unanswered."""
        while self.frames - self._delivered >= self._window:
            self._answered.clear()
            await self._answered.wait()
        self._kept.append(_Frame(audio, time.monotonic()))
        self._arrived.set()

    def end(self) -> None:
        """End of stream: no more frames."""
        self._ended_at = time.monotonic()
        self._arrived.set()

    async def run(self) -> None:
        """Relay until the response to end of stream has been sent; raises `StreamClosed` when the
        stream cannot go on (bad config: 400; no worker: 503)."""
        full = 0  # consecutive "worker full" answers
        retries = 0  # of the current streak of failures
        deadline = 0.0
        while True:
            delivered_before = self._delivered
            try:
                await self._attempt(replay=retries > 0)
                return
            except NoWorker as err:
                if retries == 0:  # a new stream: nowhere to go
                    raise unavailable(str(err)) from None
                status, details = grpc.StatusCode.UNAVAILABLE, str(err)
            except _CallFailed as failure:
                if self.finished:  # the worker failed after its last response
                    return
                status, details = failure.status, failure.details
            if status == grpc.StatusCode.INVALID_ARGUMENT:
                raise bad_request(details)
            if self._delivered > delivered_before:  # progress: a new streak of failures
                full, retries = 0, 0
            full = full + 1 if status == grpc.StatusCode.RESOURCE_EXHAUSTED else 0
            if full >= self._workers.candidates:
                raise unavailable("every transcriber is full")
            if retries == 0:
                deadline = time.monotonic() + self._failover_timeout_s
            elif time.monotonic() > deadline:
                raise unavailable(f"transcriber failed ({status.name}) and no other took the stream")
            log_event(
                log, "stream_moving", stream_id=self.stream_id, replay_from=self._kept_start, retry=retries
            )
            REPLAYS.labels(status=status.name).inc()
            if retries:
                await asyncio.sleep(min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (retries - 1)))
            retries += 1

    async def _attempt(self, replay: bool) -> None:
        """Claim a worker and relay on one call to it; `NoWorker` or `_CallFailed` when that fails."""
        try:
            lease = await self._workers.claim(self._config.model, frozenset(self._failed_workers))
        except UnknownModel as err:
            raise bad_request(str(err)) from None
        if replay:
            REPLAYED_FRAMES.inc(self.frames - self._kept_start)
        log_event(
            log, "stream_worker", stream_id=self.stream_id, worker=lease.address, first_frame=self._kept_start
        )
        try:
            await self._call(lease.address)
        except _CallFailed as failure:
            self._failed_workers.add(lease.address)
            log_event(
                log,
                "stream_worker_failed",
                logging.WARNING,
                stream_id=self.stream_id,
                worker=lease.address,
                status=failure.status.name,
                details=failure.details,
            )
            raise
        finally:
            await self._workers.release(lease)

    async def _call(self, address: str) -> None:
        """One Transcribe call, from the first kept frame on; `_CallFailed` when it breaks."""
        config = transcriber_pb2.StreamConfig()
        config.CopyFrom(self._config)
        config.first_frame = self._kept_start
        config.continues_text = self._has_text
        call = transcriber_pb2_grpc.TranscriberStub(self._channels.get(address)).Transcribe()
        reader = asyncio.create_task(self._read(call, config.first_frame))
        writer = asyncio.create_task(self._write(call, config))
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_EXCEPTION)
            error = writer.exception() if writer.done() else None
            if error is not None and not isinstance(error, grpc.aio.AioRpcError | asyncio.InvalidStateError):
                raise error  # a bug, not a worker failure (which the reader reports)
            await reader
        except grpc.aio.AioRpcError as err:
            raise _CallFailed(err.code(), err.details() or "") from err
        finally:
            reader.cancel()
            writer.cancel()
            call.cancel()

    async def _write(self, call: grpc.aio.StreamStreamCall, config: transcriber_pb2.StreamConfig) -> None:
        await call.write(transcriber_pb2.TranscribeRequest(config=config))
        cursor = config.first_frame
        while True:
            while cursor < self.frames:
                audio = self._kept[cursor - self._kept_start].audio
                await call.write(transcriber_pb2.TranscribeRequest(audio=audio))
                cursor += 1
            if self._ended_at is not None:
                await call.write(transcriber_pb2.TranscribeRequest(end_of_stream=True))
                await call.done_writing()
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def _read(self, call: grpc.aio.StreamStreamCall, first: int) -> None:
        """Responses come one per frame in order, so the n-th is for frame `first + n`."""
        index = first
        async for response in call:
            if index > self.frames or (index == self.frames and self._ended_at is None):
                raise _CallFailed(grpc.StatusCode.INTERNAL, f"response {index} for a frame never sent")
            await self._deliver(index, response)
            index += 1
        if not self.finished:
            raise _CallFailed(grpc.StatusCode.INTERNAL, "call ended before the response to end of stream")

    def _complete_at(self, index: int) -> float:
        if index < self.frames:
            return self._kept[index - self._kept_start].complete_at
        assert self._ended_at is not None  # `_read` passes on only responses to what was sent
        return self._ended_at

    async def _deliver(self, index: int, response: transcriber_pb2.TranscribeResponse) -> None:
        final = not response.is_provisional
        if final and response.alternatives and response.alternatives[0].transcript:
            self._has_text = True
        if index < self._delivered:  # a replayed frame: the client has its response
            if final:
                self._pending_finals.append(response)
        else:
            if self._pending_finals:
                message = joined_finals([*self._pending_finals, *([response] if final else [])], response.end)
                self._pending_finals.clear()
            else:
                message = to_message(response)
            complete_at = self._complete_at(index)
            await self._send(message)
            FRAME_LATENCY.observe(time.monotonic() - complete_at)
            RESPONSES.labels(kind="provisional" if message.is_provisional else "final").inc()
            self._delivered += 1
            self._answered.set()
            final = not message.is_provisional
        if final:  # covered by a final response: no longer needed for a replay
            while self._kept and self._kept_start <= index:
                self._kept.popleft()
                self._kept_start += 1
        while self._kept and self._kept_start <= index and index + 1 - self._kept_start > self._window:
            self._kept.popleft()
            self._kept_start += 1
            REPLAY_FRAMES_DROPPED.inc()
