"""A gRPC server as every Gharial service runs it.

- standard gRPC health checking (`grpc.health.v1`): the overall status and each added service
  report SERVING once started and NOT_SERVING from the moment shutdown begins, so Kubernetes
  probes and load balancers stop sending work before the process stops;
- Prometheus metrics over HTTP on their own port (`/metrics`; prometheus-client's default registry);
- graceful shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, the service's `on_shutdown` hook
  ends its open work with a status (e.g. closes streams), then in-flight RPCs get `grace_s`
  seconds before the server stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from gharial.plumbing.logs import log_event
from gharial.plumbing.signals import wait_in_main_thread

log = logging.getLogger(__name__)

# Programs and checkpoints stream in 1 MiB chunks; leave headroom for any single message.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Channel and server options for that limit, both ways.
MESSAGE_SIZE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def serving_status(serving: bool) -> int:
    """The health-check status for serving or not."""
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, max_workers: int = 32) -> None:
        """`port` 0 picks a free port (see `.port` after `start`)."""
        self.name = name
        self.host = host
        self.requested_port = port
        self.port = 0
        self.metrics_port: int | None = None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name),
            options=MESSAGE_SIZE_OPTIONS,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._stopped = threading.Event()

    def add_service(
        self, add_to_server: Callable[[Any, grpc.Server], None], servicer: Any, full_name: str
    ) -> None:
        """Register a servicer, e.g. ``add_service(add_LicenseServicer_to_server, servicer,
        "gharial.v1.License")``; `full_name` is what health checks ask about."""
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    def start(self, metrics_port: int | None = None, metrics_host: str | None = None) -> None:
        """Bind and serve; `metrics_port` (0 = any free port) also serves `/metrics` over HTTP."""
        self.port = self.server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind gRPC port {self.host}:{self.requested_port}")
        if metrics_port is not None:
            http_server, _ = start_http_server(metrics_port, addr=metrics_host or self.host)
            self.metrics_port = http_server.server_port
        self.server.start()
        self.set_serving(True)
        log_event(log, "server_started", grpc_port=self.port, metrics_port=self.metrics_port)

    def set_serving(self, serving: bool) -> None:
        for name in ["", *self._service_names]:
            self.health.set(name, serving_status(serving))

    def stop(self, grace_s: float = 5.0, on_shutdown: Callable[[], None] | None = None) -> None:
        """Graceful stop: NOT_SERVING, the hook, then up to `grace_s` for in-flight RPCs."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log_event(log, "server_stopping", grace_s=grace_s)
        self.set_serving(False)
        if on_shutdown is not None:
            on_shutdown()
        self.server.stop(grace_s).wait()
        log_event(log, "server_stopped")

    def run_until_signal(self, on_shutdown: Callable[[], None] | None = None, grace_s: float = 5.0) -> None:
        """Block until SIGTERM or SIGINT, then `stop` gracefully (main thread only)."""
        received = threading.Event()

        def handle(signum: int, _frame: object) -> None:
            log_event(log, "signal_received", signal=signal.Signals(signum).name)
            received.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        wait_in_main_thread(received)
        self.stop(grace_s, on_shutdown)
