"""The compiler service as it runs: the real `gharial-compiler` process on loopback, configured from its
environment, compiling to the library's bytes, refusing bad input with INVALID_ARGUMENT and the
loader's message, healthy, with metrics, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gharial.accelerator.compiler import compile_checkpoint
from gharial.accelerator.wire import CHUNK_BYTES, iter_chunks, program_info_to_proto
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.protos import compiler_pb2, compiler_pb2_grpc, program_pb2

from .service_process import ServiceProcess, metric_value, running
from .test_program import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "gharial-compiler"
# The console script appears once `make install` has run with it declared; until then, the same
# main() via -m (PYTHONPATH: the `services` package lives at the repository root).
COMMAND = (
    [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "services.compiler.server"]
)


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    """Configured through its environment only; port 0: any free port (its log says which)."""
    env = {"PYTHONPATH": str(REPO), "GHARIAL_COMPILER_PORT": "0", "GHARIAL_COMPILER_METRICS_PORT": "0"}
    with running(COMMAND, env=env) as svc:
        yield svc


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[compiler_pb2_grpc.CompilerStub]:
    with service.channel() as channel:
        yield compiler_pb2_grpc.CompilerStub(channel)


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.hwckpt"
    tiny_checkpoint(tiny_tokenizer_bytes).save(path)
    return path


def compile_requests(data: bytes, notes: str | None = None) -> Iterator[compiler_pb2.CompileRequest]:
    if notes is not None:
        yield compiler_pb2.CompileRequest(options=compiler_pb2.CompileOptions(notes=notes))
    for chunk in iter_chunks(data, 4096):  # any chunk size is accepted
        yield compiler_pb2.CompileRequest(checkpoint_data=chunk)


def test_health(service: ServiceProcess) -> None:
    for name in ("", "gharial.v1.Compiler"):
        assert service.health(name) == health_pb2.HealthCheckResponse.SERVING


def test_compile_gives_the_library_bytes_and_inspect_the_info(
    stub: compiler_pb2_grpc.CompilerStub, checkpoint: Path
) -> None:
    chunks = list(stub.Compile(compile_requests(checkpoint.read_bytes(), notes="over grpc"), timeout=120))
    assert all(0 < len(c.data) <= CHUNK_BYTES for c in chunks)
    data = b"".join(c.data for c in chunks)
    expected = compile_checkpoint(HardwareCheckpoint.load(checkpoint), notes="over grpc")
    assert data == expected.to_bytes()
    info = stub.Inspect(iter([program_pb2.ProgramChunk(data=c) for c in iter_chunks(data, 1000)]), timeout=60)
    assert info == program_info_to_proto(expected.info())
    assert info.architecture == "tiny" and info.program_sha256 == expected.sha256


def test_bad_checkpoint_is_invalid_argument(stub: compiler_pb2_grpc.CompilerStub, checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Compile(compile_requests(data[: len(data) // 2]), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("uploaded checkpoint: truncated or corrupt torch file")


def test_options_after_data_is_invalid_argument(stub: compiler_pb2_grpc.CompilerStub) -> None:
    requests = [
        compiler_pb2.CompileRequest(checkpoint_data=b"x"),
        compiler_pb2.CompileRequest(options=compiler_pb2.CompileOptions(notes="late")),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Compile(iter(requests), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "options must come before checkpoint_data"


def test_bad_program_is_invalid_argument(stub: compiler_pb2_grpc.CompilerStub, checkpoint: Path) -> None:
    data = bytearray(compile_checkpoint(HardwareCheckpoint.load(checkpoint)).to_bytes())
    data[-100] ^= 0xFF
    with pytest.raises(grpc.RpcError) as caught:
        stub.Inspect(iter([program_pb2.ProgramChunk(data=bytes(data))]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("program: checksum mismatch")


def test_metrics_and_logs(service: ServiceProcess) -> None:
    text = service.metrics()
    assert metric_value(text, "gharial_compiler_compiles_total", outcome="ok") == 1
    assert metric_value(text, "gharial_compiler_compiles_total", outcome="invalid") == 2
    assert metric_value(text, "gharial_compiler_compile_seconds_count") == 1
    assert (metric_value(text, "gharial_compiler_bytes_out_total") or 0) > 0
    assert (metric_value(text, "gharial_compiler_bytes_in_total") or 0) > 0
    assert len(service.events("compiled")) == 1 and len(service.events("compile_rejected")) == 2


def test_sigterm_stops_cleanly(service: ServiceProcess) -> None:  # last: it ends the module's service
    assert service.terminate() == 0
    deadline = time.monotonic() + 10  # the log is read on another thread
    while not service.events("server_stopped") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.events("server_stopped")
