"""`gharial.v1.Transcriber` (protos/transcriber.proto) over any backend: admission, calls, draining.

A Transcribe call is served by two threads: gRPC's handler thread, which only hands responses to
gRPC, and the call's own thread, which reads the requests and runs the stream's `Session`. They
meet at a queue, so the handler can also be told to end the call when draining runs out of time.

Refusals: a bad StreamConfig is INVALID_ARGUMENT naming the field; a full worker (max streams, or
the card's state memory) RESOURCE_EXHAUSTED; a draining worker, or a backend that cannot go on
(the card went away), UNAVAILABLE, so the gateway can take the stream elsewhere.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
    """How a call ends: its status and, unless OK, the message."""

    code: grpc.StatusCode
    message: str = ""


class _Call:
    """One Transcribe call's thread: requests in, the session's responses onto `responses`, then
    the call's `_End` once the stream's resources are freed."""

    def __init__(
        self,
        session: Session,
        requests: Iterator[pb.TranscribeRequest],
        context: grpc.ServicerContext,
        stream_id: str,
        on_closed: Callable[[_Call], None],
    ) -> None:
        self.session = session
        self.stream_id = stream_id
        self.responses: queue.Queue[pb.TranscribeResponse | _End] = queue.Queue()
        self._requests = requests
        self._context = context
        self._on_closed = on_closed
        self._stopping = threading.Event()
        self._interrupted = False
        self._thread = threading.Thread(target=self._run, name=f"stream-{stream_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current request (the RPC has ended or is ending)."""
        self._stopping.set()

    def interrupt(self, message: str) -> None:
        """End the call now with UNAVAILABLE (draining ran out of time)."""
        self._interrupted = True
        self._stopping.set()
        self.responses.put(_End(grpc.StatusCode.UNAVAILABLE, message))

    def _run(self) -> None:
        started = time.monotonic()
        outcome, end = "internal", _End(grpc.StatusCode.INTERNAL, "internal error")
        try:
            outcome, end = self._serve()
        except BadAudio as error:
            outcome, end = "invalid_argument", _End(grpc.StatusCode.INVALID_ARGUMENT, f"audio: {error}")
        except BackendError as error:
            ERRORS.labels(kind="backend").inc()
            outcome, end = "backend_error", _End(grpc.StatusCode.UNAVAILABLE, str(error))
        except grpc.RpcError:
            outcome, end = "cancelled", _End(grpc.StatusCode.CANCELLED)
        except Exception:
            ERRORS.labels(kind="internal").inc()
            fields = {"stream_id": self.stream_id}
            log.error("stream_failed", exc_info=True, extra={"event": "stream_failed", "fields": fields})
        finally:
            if self._interrupted:
                outcome = "interrupted"
            self.session.close()
            STREAMS.labels(outcome=outcome).inc()
            closed: dict[str, Any] = {
                "stream_id": self.stream_id,
                "outcome": outcome,
                "frames": self.session.frames_answered,
                "seconds": round(time.monotonic() - started, 3),
            }
            if end.message:
                closed["error"] = end.message
            log_event(log, "stream_closed", **closed)
            self._on_closed(self)
            self.responses.put(end)

    def _serve(self) -> tuple[str, _End]:
        for request in self._requests:
            if self._stopping.is_set():  # the call is over: nothing more will be read
                return "cancelled", _End(grpc.StatusCode.CANCELLED)
            part = request.WhichOneof("part")
            if part == "audio":
                self.responses.put(self.session.audio(request.audio))
            elif part == "end_of_stream":
                self.responses.put(self.session.end())
                return "completed", _End(grpc.StatusCode.OK)
            else:
                message = "config: only the first message may be a config"
                return "invalid_argument", _End(grpc.StatusCode.INVALID_ARGUMENT, message)
        if not self._context.is_active():
            return "cancelled", _End(grpc.StatusCode.CANCELLED)
        return "invalid_argument", _End(
            grpc.StatusCode.INVALID_ARGUMENT, "the requests ended without end_of_stream"
        )


class TranscriberServicer(transcriber_pb2_grpc.TranscriberServicer):
    def __init__(self, backend: Backend, served: ServedModel, max_streams: int, worker_id: str = "") -> None:
        self.backend = backend
        self.served = served
        self.max_streams = max_streams
        self.worker_id = worker_id  # set once the server knows its address, before any stream
        self.draining = False
        self._calls: set[_Call] = set()
        self._open = 0  # admitted streams, counted from admission (before their call exists)
        self._condition = threading.Condition()
        MAX_STREAMS.set(max_streams)

    def GetWorkerInfo(self, request: pb.GetWorkerInfoRequest, context: grpc.ServicerContext) -> pb.WorkerInfo:
        return pb.WorkerInfo(
            worker_id=self.worker_id,
            backend=self.backend.kind,
            models=[self.served.model_id],
            max_streams=self.max_streams,
            streams_open=self._open,
            draining=self.draining,
        )

    def Transcribe(
        self, request_iterator: Iterator[pb.TranscribeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TranscribeResponse]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "config":
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "config: the first message must be a config"
            )
        try:
            options = validate_config(first.config, self.served, self.backend.model.tokenizer)
        except InvalidConfig as error:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), first.config.stream_id)
        call = self._open_call(options, request_iterator, context)
        context.add_callback(call.stop)
        try:
            while not isinstance(item := call.responses.get(), _End):
                yield item
        finally:
            call.stop()
        if item.code != grpc.StatusCode.OK:
            _abort(context, item.code, item.message)

    def _open_call(
        self, options: StreamOptions, requests: Iterator[pb.TranscribeRequest], context: grpc.ServicerContext
    ) -> _Call:
        with self._condition:
            if self.draining:
                refusal = (grpc.StatusCode.UNAVAILABLE, "the worker is draining: it takes no new streams")
            elif self._open >= self.max_streams:
                refusal = (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the worker is full ({self.max_streams} streams)",
                )
            else:
                refusal = None
                self._set_open(self._open + 1)
        if refusal is not None:
            self._refuse(context, *refusal, options.stream_id)
        try:
            stream = self.backend.open_stream(options.keywords)
        except (BackendFull, BackendError) as error:
            self._release()
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(error, BackendFull)
                else grpc.StatusCode.UNAVAILABLE
            )
            self._refuse(context, code, str(error), options.stream_id)
        session = Session(
            stream, self.backend.model, options.alternatives, options.first_frame, options.continues_text
        )
        call = _Call(session, requests, context, options.stream_id, self._closed)
        with self._condition:
            self._calls.add(call)
        log_event(
            log,
            "stream_opened",
            stream_id=options.stream_id,
            alternatives=options.alternatives,
            keywords=len(options.keywords),
            first_frame=options.first_frame,
        )
        call.start()
        return call

    def _closed(self, call: _Call) -> None:
        with self._condition:
            self._calls.discard(call)
        self._release()

    def _release(self) -> None:
        with self._condition:
            self._set_open(self._open - 1)
            self._condition.notify_all()

    def _set_open(self, count: int) -> None:
        self._open = count
        STREAMS_OPEN.set(count)

    def _refuse(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, stream_id: str = ""
    ) -> NoReturn:
        reason = {
            grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "full",
        }.get(code, "draining" if self.draining else "unavailable")
        REJECTS.labels(reason=reason).inc()
        log_event(log, "stream_refused", stream_id=stream_id, reason=reason, message=message)
        _abort(context, code, message)

    def drain(self, seconds: float) -> None:
        """Take no new streams; give the open ones `seconds` to finish, then end the rest with UNAVAILABLE."""
        with self._condition:
            self.draining = True
            DRAINING.set(1)
            log_event(log, "draining", streams_open=self._open, drain_seconds=seconds)
            self._condition.wait_for(lambda: self._open == 0, timeout=seconds)
            remaining = list(self._calls)
        for call in remaining:
            call.interrupt(f"the worker is shutting down; the stream did not finish within {seconds:g} s")
        if remaining:
            log_event(log, "streams_interrupted", logging.WARNING, streams=len(remaining))
        with self._condition:
            self._condition.wait_for(lambda: self._open == 0, timeout=INTERRUPT_WAIT_S)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort always raises")
