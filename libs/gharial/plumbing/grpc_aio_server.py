"""An asyncio gRPC server (`grpc.aio`), for services that hold many long streams.

A thread-per-call server spends its time handing the GIL from thread to thread once hundreds of
streams each send a message every 60 ms; on one event loop a message costs a coroutine step. The
rest is as `GrpcServer`: standard health checking that goes NOT_SERVING from the moment shutdown
begins, Prometheus metrics over HTTP on their own port, graceful shutdown on SIGTERM/SIGINT (the
service's `on_shutdown` coroutine ends its open work, then in-flight RPCs get `grace_s` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import start_http_server

from gharial.plumbing.grpc_server import MESSAGE_SIZE_OPTIONS, serving_status
from gharial.plumbing.logs import log_event

log = logging.getLogger(__name__)


class AsyncGrpcServer:
    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        """`port` 0 picks a free port (see `.port` after `start`). Create it inside the event loop."""
        self.name = name
        self.host = host
        self.requested_port = port
        self.port = 0
        self.metrics_port: int | None = None
        self.server = grpc.aio.server(options=MESSAGE_SIZE_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._stopping = False

    def add_service(
        self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str
    ) -> None:
        """Register a servicer; `full_name` is what health checks ask about."""
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self, metrics_port: int | None = None) -> None:
        """Bind and serve; `metrics_port` (0 = any free port) also serves `/metrics` over HTTP."""
        self.port = self.server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind gRPC port {self.host}:{self.requested_port}")
        if metrics_port is not None:
            http_server, _ = start_http_server(metrics_port, addr=self.host)
            self.metrics_port = http_server.server_port
        await self.server.start()
        await self.set_serving(True)
        log_event(log, "server_started", grpc_port=self.port, metrics_port=self.metrics_port)

    async def set_serving(self, serving: bool) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, serving_status(serving))

    async def run_until_signal(
        self, on_shutdown: Callable[[], Awaitable[None]] | None = None, grace_s: float = 5.0
    ) -> None:
        """Serve until SIGTERM or SIGINT, then `stop` gracefully."""
        received = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum, received)
        await received.wait()
        await self.stop(grace_s, on_shutdown)

    def _on_signal(self, signum: int, received: asyncio.Event) -> None:
        log_event(log, "signal_received", signal=signal.Signals(signum).name)
        received.set()

    async def stop(
        self, grace_s: float = 5.0, on_shutdown: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Graceful stop: NOT_SERVING, the hook, then up to `grace_s` for in-flight RPCs."""
        if self._stopping:
            return
        self._stopping = True
        log_event(log, "server_stopping", grace_s=grace_s)
        await self.set_serving(False)
        if on_shutdown is not None:
            await on_shutdown()
        await self.server.stop(grace_s)
        log_event(log, "server_stopped")
