"""Run a real Gharial service as a subprocess for integration tests.

Services started with `--port 0 --metrics-port 0` bind free ports and log them in their
`server_started` event (gharial.plumbing.grpc_server); `ServiceProcess` waits for that line, keeps
every JSON log line for assertions, and stops the process with SIGTERM like Kubernetes does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gharial.plumbing.logs import parse_log_line

BIN = Path(sys.executable).parent


class ServiceProcess:
    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.command = command
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._started = threading.Event()
        self.grpc_port = 0
        self.metrics_port = 0
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            event = parse_log_line(line)
            if event.get("event") == "server_started":
                self.grpc_port = int(event["grpc_port"])
                self.metrics_port = int(event.get("metrics_port") or 0)
                self._started.set()

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.command[0]} did not start:\n" + "\n".join(self.lines[-30:]))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[("grpc.max_receive_message_length", 1 << 26), ("grpc.max_send_message_length", 1 << 26)],
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in map(parse_log_line, list(self.lines)) if e.get("event") == name]

    def health(self, service: str = "") -> int:
        with self.channel() as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return str(reply.read().decode())

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM, then the exit code (raises if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextmanager
def running(command: list[str], env: dict[str, str] | None = None) -> Iterator[ServiceProcess]:
    """A started service; killed at the end if the test did not stop it."""
    service = ServiceProcess(command, env)
    try:
        service.wait_started()
        yield service
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()


def metric_value(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part and "=" in part)
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            return float(value)
    return None
