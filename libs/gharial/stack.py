"""The local all-in-one stack (`gharial up`): every service as its own process on loopback.

Start order follows the dependencies: Redis (a private `redis-server` unless `$REDIS_URL` is set),
the licence service (with a throwaway development vendor key and one licence per emulated card,
made at start — production mounts real licences), the compiler (which compiles the model into the
program the cards run), then per card an emulator and its transcriber (or, with the cpu backend,
transcribers only), then the gateway. Services bind free ports (`--port 0`) and announce them in
their `server_started` log line; the stack reads them from there. Stopping sends SIGTERM in reverse
order, so each service drains as it would on Kubernetes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

import grpc

import gharial
from gharial.accelerator.wire import iter_chunks
from gharial.licensing import LicenseBody, generate_keys, load_private_key, sign_license, write_license
from gharial.plumbing.logs import parse_log_line
from gharial.protos import compiler_pb2, compiler_pb2_grpc

BIN = Path(sys.executable).parent
Backend = Literal["cpu", "accelerator"]


class StackError(RuntimeError):
    """A service did not start; the message carries its last log lines."""


@dataclass
class ServiceProcess:
    """One service subprocess whose JSON log lines on stderr are kept and echoed to `log_file`."""

    name: str
    command: list[str]
    log_file: Path
    process: subprocess.Popen[str] = field(init=False)
    ports: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _started: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = 120) -> None:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"{self.name} did not start:\n" + "\n".join(self.lines[-20:]))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        with self.log_file.open("a") as log:
            for line in self.process.stderr:
                self.lines.append(line.rstrip("\n"))
                log.write(line)
                log.flush()
                event = parse_log_line(line)
                if event.get("event") == "server_started":
                    self.ports = {k: int(v) for k, v in event.items() if k.endswith("_port") and v}
                    self._started.set()

    @property
    def port(self) -> int:
        return self.ports.get("http_port") or self.ports["grpc_port"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 40) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LocalStack:
    def __init__(
        self,
        cards: int = 1,
        backend: Backend = "accelerator",
        checkpoint: Path | None = None,
        gateway_port: int = 3030,
        workdir: Path | None = None,
    ) -> None:
        self.cards = cards
        self.backend = backend
        self.checkpoint = checkpoint or gharial_bundled_checkpoint()
        self.gateway_port = gateway_port
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gharial-up-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.services: list[ServiceProcess] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_url = os.environ.get("REDIS_URL", "")

    def _start(self, name: str, *args: str) -> ServiceProcess:
        command = [str(BIN / f"gharial-{name.split('-')[0]}"), *args]
        service = ServiceProcess(name, command, self.workdir / f"{name}.log")
        service.start()
        self.services.append(service)
        return service

    def up(self) -> None:
        try:
            self._start_redis()
            transcriber_args = ["--redis-url", self.redis_url, "--port", "0", "--metrics-port", "0"]
            if self.backend == "accelerator":
                license_service = self._start_license_service()
                program = self._compile()
                for k in range(self.cards):
                    emulator = self._start(
                        f"emulator-{k}", "--card-id", f"card-{k}", "--port", "0", "--metrics-port", "0"
                    )
                    self._start(
                        f"transcriber-{k}",
                        *transcriber_args,
                        "--card-id", f"card-{k}",
                        "--emulator", emulator.address,
                        "--program", str(program),
                        "--license-service", license_service.address,
                    )  # fmt: skip
            else:
                for k in range(self.cards):
                    self._start(
                        f"transcriber-{k}",
                        *transcriber_args,
                        "--cpu-backend", "--checkpoint", str(self.checkpoint), "--worker-id", f"cpu-{k}",
                    )  # fmt: skip
            self._start("gateway", "--redis-url", self.redis_url, "--port", str(self.gateway_port))
        except BaseException:
            self.down()
            raise

    def _start_redis(self) -> None:
        if self.redis_url:
            return
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StackError("redis-server is not installed and $REDIS_URL is not set")
        port = _free_port()
        self.redis = subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=(self.workdir / "redis.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.redis.poll() is not None:
                    raise StackError(
                        f"redis-server did not start (see {self.workdir / 'redis.log'})"
                    ) from None
                time.sleep(0.05)

    def _start_license_service(self) -> ServiceProcess:
        """A throwaway vendor key and one licence per card: development only."""
        vendor, licences = self.workdir / "vendor", self.workdir / "licences"
        vendor.mkdir(exist_ok=True)
        licences.mkdir(exist_ok=True)
        private_path, public_path = generate_keys(vendor)
        shutil.copy(public_path, licences / public_path.name)
        private_key = load_private_key(private_path)
        for k in range(self.cards):
            body = LicenseBody(
                license_id=f"DEV-{k}",
                card_id=f"card-{k}",
                licensee="gharial up (development licence)",
                max_program_version=gharial.__version__,
                max_release_date=date.fromisoformat(gharial.RELEASE_DATE),
                expires=date.today() + timedelta(days=30),
                issued=datetime.now(UTC),
            )
            write_license(licences / f"card-{k}.lic", sign_license(body, private_key))
        return self._start("license", "--license-dir", str(licences), "--port", "0", "--metrics-port", "0")

    def _compile(self) -> Path:
        compiler = self._start("compiler", "--port", "0", "--metrics-port", "0")
        data = self.checkpoint.read_bytes()
        requests = [compiler_pb2.CompileRequest(options=compiler_pb2.CompileOptions(notes="gharial up"))]
        requests += [compiler_pb2.CompileRequest(checkpoint_data=c) for c in iter_chunks(data)]
        with grpc.insecure_channel(compiler.address) as channel:
            program = b"".join(
                c.data for c in compiler_pb2_grpc.CompilerStub(channel).Compile(iter(requests))
            )
        path = self.workdir / "model.prog"
        path.write_bytes(program)
        return path

    @property
    def gateway_address(self) -> tuple[str, int]:
        gateway = next(s for s in self.services if s.name == "gateway")
        return "127.0.0.1", gateway.port

    def summary(self) -> list[tuple[str, str]]:
        """(service, where it listens) for every process; logs are in workdir/<service>.log."""
        rows = [("redis", self.redis_url + ("" if self.redis else " (external)"))]
        for s in self.services:
            where = f"ws://127.0.0.1:{s.port}/asr/v0.1/stream" if s.name == "gateway" else f"grpc {s.address}"
            metrics = s.ports.get("metrics_port")
            if metrics and s.name != "gateway":
                where += f", metrics http://127.0.0.1:{metrics}/metrics"
            rows.append((s.name, where))
        return rows

    def down(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services = []
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)


def gharial_bundled_checkpoint() -> Path:
    from gharial.asr.pipeline import bundled_checkpoint

    return bundled_checkpoint()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
