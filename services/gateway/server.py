"""`gharial-gateway`: the websocket gateway (DESIGN §1), FastAPI served by uvicorn.

Clients stream audio to `ws://HOST:3030/asr/v0.1/stream`; each stream goes to one transcriber,
chosen by the Redis load balancer (`--redis-url`) or round robin over `--transcriber` addresses.
The same port serves `/healthz`, `/readyz`, `/metrics` and `/docs`. Every flag can also be set as
GHARIAL_GATEWAY_<FLAG>, e.g. GHARIAL_GATEWAY_REDIS_URL. The process binds its socket itself, so
`--port 0` takes any free port, logged in the `server_started` event (as `http_port`, and as
`grpc_port` and `metrics_port` too, which is what tests/service_process.py reads). SIGTERM drains
(see `DrainingServer`) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError

from gharial.gateway.app import create_app
from gharial.gateway.auth import read_key_hashes
from gharial.gateway.session import StreamEndpoint
from gharial.gateway.settings import DEFAULT_MODEL, GatewaySettings
from gharial.plumbing.logs import LogLevel, configure_logging, log_event
from gharial.plumbing.memory import freeze_startup_objects

log = logging.getLogger(__name__)

ENV_PREFIX = "GHARIAL_GATEWAY_"
# After the drain, how long uvicorn waits for the closed streams' tasks to end.
CLEANUP_S = 5


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar=f"{ENV_PREFIX}HOST", help="address to listen on")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar=f"{ENV_PREFIX}PORT", min=0, max=65535, help="HTTP port (0: any free port)")
    ] = 3030,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar=f"{ENV_PREFIX}REDIS_URL", help="Redis of the load balancer, e.g. redis://redis:6379/0"
        ),
    ] = None,
    transcriber: Annotated[
        list[str] | None,
        typer.Option(
            envvar=f"{ENV_PREFIX}TRANSCRIBER",
            help="transcriber gRPC address host:port, used round robin when there is no --redis-url "
            "(repeatable; in the variable, separated by spaces)",
        ),
    ] = None,
    default_model: Annotated[
        str, typer.Option(envvar=f"{ENV_PREFIX}DEFAULT_MODEL", help="model of streams that name none")
    ] = DEFAULT_MODEL,
    max_connections: Annotated[
        int,
        typer.Option(
            envvar=f"{ENV_PREFIX}MAX_CONNECTIONS", min=1, help="open websockets at most; more get 503"
        ),
    ] = 1000,
    max_frame_bytes: Annotated[
        int,
        typer.Option(
            envvar=f"{ENV_PREFIX}MAX_FRAME_BYTES",
            min=1920,
            help="largest client frame; larger ones close with 1009",
        ),
    ] = 1 << 20,
    idle_timeout_s: Annotated[
        float,
        typer.Option(
            envvar=f"{ENV_PREFIX}IDLE_TIMEOUT_S",
            min=0.001,
            help="close a stream with no frame for this long (1008)",
        ),
    ] = 30.0,
    api_key_hash: Annotated[
        list[str] | None,
        typer.Option(
            envvar=f"{ENV_PREFIX}API_KEY_HASH",
            help="SHA-256 (hex) of an accepted API key (repeatable); with none, auth is off",
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(
            envvar=f"{ENV_PREFIX}API_KEYS_FILE",
            exists=True,
            dir_okay=False,
            help="file of accepted API keys' SHA-256 hashes, one per line ('#' comments)",
        ),
    ] = None,
    failover_timeout_s: Annotated[
        float,
        typer.Option(
            envvar=f"{ENV_PREFIX}FAILOVER_TIMEOUT_S",
            min=0.001,
            help="how long a stream whose transcriber failed looks for another before closing with 503",
        ),
    ] = 15.0,
    replay_window_s: Annotated[
        float,
        typer.Option(
            envvar=f"{ENV_PREFIX}REPLAY_WINDOW_S",
            min=0.06,
            help="audio kept per stream since its last final response, replayed if its transcriber fails",
        ),
    ] = 60.0,
    lease_s: Annotated[
        float,
        typer.Option(
            envvar=f"{ENV_PREFIX}LEASE_S", min=0.1, help="load balancer claim lease (renewed every third)"
        ),
    ] = 30.0,
    grace_s: Annotated[
        float,
        typer.Option(
            envvar=f"{ENV_PREFIX}GRACE_S",
            min=0,
            help="on SIGTERM, seconds open streams may take to finish (new ones get 503) before they are "
            "closed with 1012; a second signal stops at once",
        ),
    ] = 30.0,
    log_level: Annotated[
        LogLevel,
        typer.Option(envvar=f"{ENV_PREFIX}LOG_LEVEL", case_sensitive=False, help="least severe level logged"),
    ] = LogLevel.INFO,
) -> None:
    """Serve the websocket API (GET /asr/v0.1/stream) and relay each stream to a transcriber."""
    configure_logging("gateway", log_level.value)
    try:
        hashes = [*(api_key_hash or []), *(read_key_hashes(api_keys_file) if api_keys_file else [])]
        settings = GatewaySettings(
            redis_url=redis_url,
            transcribers=transcriber or [],
            default_model=default_model,
            max_connections=max_connections,
            max_frame_bytes=max_frame_bytes,
            idle_timeout_s=idle_timeout_s,
            api_key_hashes=hashes,
            failover_timeout_s=failover_timeout_s,
            replay_window_s=replay_window_s,
            lease_s=lease_s,
        )
        fastapi_app = create_app(settings)
        sock = socket.create_server((host, port), reuse_port=False)
    except (ValidationError, ValueError, OSError) as err:
        log_event(log, "startup_failed", logging.ERROR, reason=str(err))
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    config = uvicorn.Config(
        fastapi_app,
        log_config=None,  # our JSON lines (configure_logging), not uvicorn's formats
        access_log=False,
        ws="websockets-sansio",
        ws_per_message_deflate=False,  # audio frames do not compress: deflating them only costs CPU
        ws_max_size=settings.max_frame_bytes,
        timeout_graceful_shutdown=CLEANUP_S,
    )
    # uvicorn logs each websocket's URL, query string (and so any api_key) included, at INFO.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    try:
        asyncio.run(_serve(DrainingServer(config, fastapi_app.state.streams, grace_s), sock))
    finally:
        log_event(log, "server_stopped")


def _exit_cleanly(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM outside uvicorn's handling: before it starts, or re-raised by it after its graceful
    shutdown. Exit 0 like the other services, not "killed by SIGTERM"."""
    raise SystemExit(0)


class DrainingServer(uvicorn.Server):
    """uvicorn's shutdown closes open websockets at once (1012), which would cut every stream on a
    rolling update. On the first SIGTERM/SIGINT this server drains first: new streams get 503 and
    /readyz fails, open ones get `grace_s` seconds to finish; then uvicorn shuts down. A second
    signal skips the wait."""

    def __init__(self, config: uvicorn.Config, streams: StreamEndpoint, grace_s: float) -> None:
        super().__init__(config)
        self.streams = streams
        self.grace_s = grace_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None or not self.started:
            super().handle_exit(sig, frame)
            return
        self.drain_deadline = time.monotonic() + self.grace_s
        self.streams.draining = True
        log_event(log, "server_draining", signal=signal.Signals(sig).name, streams=self.streams.open)

    async def on_tick(self, counter: int) -> bool:
        """Every 100 ms (uvicorn's main loop): stop once drained."""
        if self.drain_deadline is not None and (
            self.streams.open == 0 or time.monotonic() > self.drain_deadline
        ):
            self.should_exit = True
        return await super().on_tick(counter)


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """Run uvicorn on `sock` and log `server_started` once it accepts connections."""
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        freeze_startup_objects()  # a full collection would otherwise stall every stream (~70 ms)
        port = sock.getsockname()[1]
        log_event(log, "server_started", http_port=port, grpc_port=port, metrics_port=port)
    await serving


def main() -> None:
    app()


if __name__ == "__main__":
    main()
