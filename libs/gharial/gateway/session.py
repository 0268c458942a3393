"""The stream endpoint, `GET /asr/v0.1/stream`: one websocket connection from accept to Close.

Every connection is accepted first, then checked (connection limit: 503, API key: 401, parameters:
400); a failed check closes it with a code and a reason starting with the status (see
`gharial.gateway.closing`). An accepted stream reads binary frames, re-cuts them into 60 ms frames
for a `Relay`, and closes normally (1000) after the response to end of stream. Clients that break
the protocol get a clear Close too: a text frame (1003), no frame for `idle_timeout_s` (1008,
"408"); frames over `max_frame_bytes` are refused by the server (1009, see services/gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gharial.gateway.auth import ApiKeys
from gharial.gateway.channels import Channels
from gharial.gateway.closing import CloseCode, StreamClosed, bad_request, unavailable
from gharial.gateway.framing import Reframer
from gharial.gateway.messages import SUBPROTOCOL, StreamResponse
from gharial.gateway.metrics import AUDIO_BYTES, CONNECTIONS_OPEN, REJECTS, STREAMS
from gharial.gateway.params import ParamError, StreamParams, parse_query
from gharial.gateway.relay import Relay
from gharial.gateway.settings import GatewaySettings
from gharial.gateway.workers import Workers
from gharial.plumbing.logs import log_event
from gharial.protos import transcriber_pb2

log = logging.getLogger(__name__)


class StreamEndpoint:
    """The ASGI websocket endpoint; one instance per gateway, shared by all its streams."""

    def __init__(
        self, settings: GatewaySettings, workers: Workers, channels: Channels, keys: ApiKeys
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.channels = channels
        self.keys = keys
        self.open = 0
        # Set when the gateway is shutting down: open streams finish, new ones get 503.
        self.draining = False

    async def __call__(self, websocket: WebSocket) -> None:
        stream_id = uuid.uuid4().hex[:16]
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        self.open += 1
        CONNECTIONS_OPEN.inc()
        started = time.monotonic()
        outcome, code, reason = "completed", CloseCode.NORMAL, ""
        try:
            await self._stream(websocket, stream_id)
        except StreamClosed as closed:
            outcome, code, reason = "rejected", closed.code, closed.reason
            REJECTS.labels(code=str(closed.status)).inc()
        except WebSocketDisconnect:
            outcome = "client_gone"
        except Exception:
            log.exception(
                "stream failed", extra={"event": "stream_failed", "fields": {"stream_id": stream_id}}
            )
            outcome, code, reason = "error", CloseCode.INTERNAL_ERROR, "500 internal error"
        finally:
            self.open -= 1
            CONNECTIONS_OPEN.dec()
        STREAMS.labels(outcome=outcome).inc()
        seconds = round(time.monotonic() - started, 3)
        log_event(
            log,
            "stream_closed",
            stream_id=stream_id,
            outcome=outcome,
            code=code,
            reason=reason,
            seconds=seconds,
        )
        if outcome != "client_gone":
            await _close(websocket, code, reason)

    async def _stream(self, websocket: WebSocket, stream_id: str) -> None:
        if self.draining:
            raise unavailable("gateway shutting down")
        if self.open > self.settings.max_connections:
            raise unavailable("maximum number of simultaneous connections reached")
        try:
            query = parse_query(websocket.scope["query_string"])
            self.keys.check(websocket.headers, query)
            params = StreamParams.from_query(query)
        except ParamError as err:
            raise bad_request(str(err)) from None
        config = transcriber_pb2.StreamConfig(
            stream_id=stream_id,
            model=params.model or self.settings.default_model,
            version=params.version,
            lang=params.lang,
            alternatives=params.alternatives,
        )
        client = websocket.client
        log_event(
            log,
            "stream_opened",
            stream_id=stream_id,
            client=f"{client.host}:{client.port}" if client else None,
            **params.model_dump(exclude={"model"}),
            model=config.model,
        )

        async def send(response: StreamResponse) -> None:
            await websocket.send_text(response.model_dump_json())

        relay = Relay(
            stream_id,
            config,
            self.workers,
            self.channels,
            send,
            self.settings.replay_window_frames,
            self.settings.failover_timeout_s,
        )
        run = asyncio.create_task(relay.run())
        read = asyncio.create_task(self._read(websocket, relay))
        try:
            await asyncio.wait((run, read), return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                read.result()  # end of stream returns; anything else raises
            await run
        finally:
            run.cancel()
            read.cancel()
            await asyncio.gather(run, read, return_exceptions=True)

    async def _read(self, websocket: WebSocket, relay: Relay) -> None:
        """Client frames → 60 ms frames for the relay, until the zero-length frame (end of stream)."""
        reframer = Reframer()
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), self.settings.idle_timeout_s)
            except TimeoutError:
                raise StreamClosed(
                    CloseCode.POLICY_VIOLATION,
                    408,
                    f"no frame received for {self.settings.idle_timeout_s:g} s",
                ) from None
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", CloseCode.NORMAL))
            if message.get("text") is not None:
                raise StreamClosed(
                    CloseCode.UNSUPPORTED_DATA,
                    400,
                    "text frames are not accepted: send audio in binary frames",
                )
            data: bytes = message.get("bytes") or b""
            if not data:
                if (tail := reframer.flush()) is not None:
                    await relay.feed(tail)
                relay.end()
                return
            AUDIO_BYTES.inc(len(data))
            for frame in reframer.push(data):
                await relay.feed(frame)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close unless the client is gone already."""
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.close(code, reason)
