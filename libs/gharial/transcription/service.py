"""`gharial.v1.Transcriber` (protos/transcriber.proto) over any backend: admission, calls, draining.

Calls run on one event loop (`grpc.aio`): a Transcribe call is a coroutine that reads a request,
runs it through the stream's `Session` and yields the response. Draining ends the calls that do
not finish in time by cancelling their tasks, which then end with UNAVAILABLE.

Refusals: a bad StreamConfig is INVALID_ARGUMENT naming the field; a full worker (max streams, or
the card's state memory) RESOURCE_EXHAUSTED; a draining worker, or a backend that cannot go on
(the card went away), UNAVAILABLE, so the gateway can take the stream elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, NoReturn

import grpc
from pydantic import BaseModel, ConfigDict

from gharial.asr.tokenizer import Tokenizer
from gharial.plumbing.logs import log_event
from gharial.protos import transcriber_pb2 as pb
from gharial.protos import transcriber_pb2_grpc
from gharial.transcription.backend import Backend, BackendError, BackendFull
from gharial.transcription.metrics import DRAINING, ERRORS, MAX_STREAMS, REJECTS, STREAMS, STREAMS_OPEN
from gharial.transcription.session import BadAudio, Session

log = logging.getLogger(__name__)

SERVICE_NAME = "gharial.v1.Transcriber"
MAX_ALTERNATIVES = 10  # what a StreamConfig may ask for (the gateway's limit too)
INTERRUPT_WAIT_S = 5.0  # after draining runs out: how long ended calls get to clean up


class ServedModel(BaseModel):
    """What this worker serves; a StreamConfig must ask for it or leave the field empty."""

    model_config = ConfigDict(frozen=True)

    model_id: str
    version: str
    lang: str  # BCP 47; streams asking for the same primary language are served


class StreamOptions(BaseModel):
    """A validated StreamConfig."""

    model_config = ConfigDict(frozen=True)

    stream_id: str
    alternatives: int
    keywords: list[list[int]]  # token ids of each keyword
    first_frame: int
    continues_text: bool


class InvalidConfig(ValueError):
    """The message names the StreamConfig field at fault."""


def validate_config(config: pb.StreamConfig, served: ServedModel, tokenizer: Tokenizer) -> StreamOptions:
    if config.model and config.model != served.model_id:
        raise InvalidConfig(
            f"model: {config.model!r} is not served here (this worker serves {served.model_id!r})"
        )
    if config.version not in ("", "latest", served.version):
        raise InvalidConfig(
            f"version: {served.model_id} version {config.version!r} is not served here "
            f"(this worker serves {served.version!r}, or ask for 'latest')"
        )
    if config.lang and _primary_language(config.lang) != _primary_language(served.lang):
        raise InvalidConfig(f"lang: {config.lang!r} is not the model's language ({served.lang})")
    if config.alternatives > MAX_ALTERNATIVES:
        raise InvalidConfig(f"alternatives: at most {MAX_ALTERNATIVES}, got {config.alternatives}")
    keywords = []
    for i, keyword in enumerate(config.keywords):
        ids = tokenizer.encode(keyword)
        if not ids:
            raise InvalidConfig(f"keywords[{i}]: {keyword!r} has no characters the model can spell")
        keywords.append(ids)
    return StreamOptions(
        stream_id=config.stream_id or uuid.uuid4().hex[:12],
        alternatives=max(1, config.alternatives),
        keywords=keywords,
        first_frame=config.first_frame,
        continues_text=config.continues_text,
    )


def _primary_language(tag: str) -> str:
    return tag.split("-")[0].lower()


class _End(NamedTuple):
    """How a call ends: its outcome (for logs and metrics), its status and, unless OK, the message."""

    outcome: str
    code: grpc.StatusCode
    message: str = ""


class _Call:
    """One admitted Transcribe call: its session and the task serving it (for draining)."""

    def __init__(self, session: Session, stream_id: str) -> None:
        self.session = session
        self.stream_id = stream_id
        self.task = asyncio.current_task()
        self.interrupted = ""  # set by draining: why the call ends now
        # How the call ended; a call closed from outside (the client went away) keeps this one.
        self.end = _End("cancelled", grpc.StatusCode.CANCELLED)

    def interrupt(self, message: str) -> None:
        self.interrupted = message
        if self.task is not None:
            self.task.cancel()

    async def serve(
        self, requests: AsyncIterator[pb.TranscribeRequest]
    ) -> AsyncIterator[pb.TranscribeResponse]:
        """The responses, one per audio request and one at end of stream; then `self.end` says how
        the call ended."""
        try:
            async for request in requests:
                part = request.WhichOneof("part")
                if part == "audio":
                    yield await self.session.audio(request.audio)
                elif part == "end_of_stream":
                    yield await self.session.end()
                    self.end = _End("completed", grpc.StatusCode.OK)
                    return
                else:
                    message = "config: only the first message may be a config"
                    self.end = _End("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, message)
                    return
            self.end = _End(
                "invalid_argument",
                grpc.StatusCode.INVALID_ARGUMENT,
                "the requests ended without end_of_stream",
            )
        except BadAudio as error:
            self.end = _End("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, f"audio: {error}")
        except BackendError as error:
            ERRORS.labels(kind="backend").inc()
            self.end = _End("backend_error", grpc.StatusCode.UNAVAILABLE, str(error))
        except asyncio.CancelledError:
            if not self.interrupted:  # the client went away
                raise
            self.end = _End("interrupted", grpc.StatusCode.UNAVAILABLE, self.interrupted)
        except Exception:
            self.end = _End("internal", grpc.StatusCode.INTERNAL, "internal error")
            ERRORS.labels(kind="internal").inc()
            fields = {"stream_id": self.stream_id}
            log.error("stream_failed", exc_info=True, extra={"event": "stream_failed", "fields": fields})


class TranscriberServicer(transcriber_pb2_grpc.TranscriberServicer):
    def __init__(self, backend: Backend, served: ServedModel, max_streams: int, worker_id: str = "") -> None:
        self.backend = backend
        self.served = served
        self.max_streams = max_streams
        self.worker_id = worker_id  # set once the server knows its address, before any stream
        self.draining = False
        self._calls: set[_Call] = set()
        self._open = 0  # admitted streams, counted from admission (before their call exists)
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        MAX_STREAMS.set(max_streams)

    async def GetWorkerInfo(
        self, request: pb.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return pb.WorkerInfo(
            worker_id=self.worker_id,
            backend=self.backend.kind,
            models=[self.served.model_id],
            max_streams=self.max_streams,
            streams_open=self._open,
            draining=self.draining,
        )

    async def Transcribe(
        self, request_iterator: AsyncIterator[pb.TranscribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TranscribeResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "config":
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "config: the first message must be a config"
            )
        try:
            options = validate_config(first.config, self.served, self.backend.model.tokenizer)
        except InvalidConfig as error:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), first.config.stream_id)
        call = await self._open_call(options, context)
        started = time.monotonic()
        try:
            async for response in call.serve(request_iterator):
                yield response
        finally:
            await self._close_call(call, started)
        if call.end.code != grpc.StatusCode.OK:
            await _abort(context, call.end.code, call.end.message)

    async def _open_call(self, options: StreamOptions, context: grpc.aio.ServicerContext) -> _Call:
        if self.draining:
            await self._refuse(
                context, grpc.StatusCode.UNAVAILABLE, "the worker is draining: it takes no new streams",
                options.stream_id,
            )  # fmt: skip
        if self._open >= self.max_streams:
            full = f"the worker is full ({self.max_streams} streams)"
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, full, options.stream_id)
        self._set_open(self._open + 1)
        try:
            stream = await self.backend.open_stream(options.keywords)
        except (BackendFull, BackendError) as error:
            self._set_open(self._open - 1)
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(error, BackendFull)
                else grpc.StatusCode.UNAVAILABLE
            )
            await self._refuse(context, code, str(error), options.stream_id)
        session = Session(
            stream, self.backend.model, options.alternatives, options.first_frame, options.continues_text
        )
        call = _Call(session, options.stream_id)
        self._calls.add(call)
        log_event(
            log,
            "stream_opened",
            stream_id=options.stream_id,
            alternatives=options.alternatives,
            keywords=len(options.keywords),
            first_frame=options.first_frame,
        )
        return call

    async def _close_call(self, call: _Call, started: float) -> None:
        """Free the stream's resources, count and log how it ended."""
        end = call.end
        try:
            await asyncio.shield(call.session.close())
        finally:
            STREAMS.labels(outcome=end.outcome).inc()
            closed: dict[str, Any] = {
                "stream_id": call.stream_id,
                "outcome": end.outcome,
                "frames": call.session.frames_answered,
                "seconds": round(time.monotonic() - started, 3),
            }
            if end.message:
                closed["error"] = end.message
            log_event(log, "stream_closed", **closed)
            self._calls.discard(call)
            self._set_open(self._open - 1)

    def _set_open(self, count: int) -> None:
        self._open = count
        STREAMS_OPEN.set(count)
        if count == 0:
            self._all_closed.set()
        else:
            self._all_closed.clear()

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, stream_id: str = ""
    ) -> NoReturn:
        reason = {
            grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "full",
        }.get(code, "draining" if self.draining else "unavailable")
        REJECTS.labels(reason=reason).inc()
        log_event(log, "stream_refused", stream_id=stream_id, reason=reason, message=message)
        await _abort(context, code, message)

    async def drain(self, seconds: float) -> None:
        """Take no new streams; give the open ones `seconds` to finish, then end the rest with UNAVAILABLE."""
        self.draining = True
        DRAINING.set(1)
        log_event(log, "draining", streams_open=self._open, drain_seconds=seconds)
        if await _wait(self._all_closed, seconds):
            return
        remaining = list(self._calls)
        for call in remaining:
            call.interrupt(f"the worker is shutting down; the stream did not finish within {seconds:g} s")
        if remaining:
            log_event(log, "streams_interrupted", logging.WARNING, streams=len(remaining))
        await _wait(self._all_closed, INTERRUPT_WAIT_S)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` is set within `seconds`."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort always raises")
