"""`gharial-compiler`: the model compiler as a gRPC service (`gharial.v1.Compiler`, DESIGN §3).

Compile streams a hardware checkpoint in and the program out, both in chunks (programs outgrow
gRPC's message limit); Inspect validates a program and returns its ProgramInfo. The work is
`gharial.accelerator.compiler.compile_checkpoint`, so the service and `gharial compile` give the
same bytes. Health checking, `/metrics`, JSON logs and a graceful SIGTERM come from
`gharial.plumbing`. Every flag can also be set as GHARIAL_COMPILER_<FLAG>, e.g. GHARIAL_COMPILER_PORT.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import grpc
import typer
from prometheus_client import Counter, Histogram

from gharial.accelerator.compiler import CompileError, compile_checkpoint
from gharial.accelerator.program import Program, ProgramError
from gharial.accelerator.wire import iter_chunks, program_info_to_proto
from gharial.asr.checkpoint import CheckpointError, HardwareCheckpoint
from gharial.plumbing.grpc_server import GrpcServer
from gharial.plumbing.logs import LogLevel, configure_logging, log_event
from gharial.protos import compiler_pb2, compiler_pb2_grpc, program_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "gharial.v1.Compiler"
ENV_PREFIX = "GHARIAL_COMPILER_"
UPLOAD_NAME = "uploaded checkpoint"  # how error messages name the checkpoint a client sent

COMPILES = Counter("gharial_compiler_compiles", "Compile calls, by outcome (ok, invalid, error)", ["outcome"])
COMPILE_SECONDS = Histogram(
    "gharial_compiler_compile_seconds",
    "Seconds from a checkpoint's last byte in to its program ready (successful compiles)",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
BYTES_IN = Counter("gharial_compiler_bytes_in", "Checkpoint and program bytes received")
BYTES_OUT = Counter("gharial_compiler_bytes_out", "Program bytes sent")
INSPECTS = Counter("gharial_compiler_inspects", "Inspect calls, by outcome (ok, invalid)", ["outcome"])


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """`context.abort` raises to end the RPC; this says so to the type checker."""
    context.abort(code, message)
    raise AssertionError("context.abort returned")


def compile_bytes(checkpoint: bytes, notes: str) -> bytes:
    """The program file of a hardware checkpoint file's bytes (CheckpointError, CompileError)."""
    with tempfile.TemporaryDirectory(prefix="gharial-compile-") as tmp:
        path = Path(tmp) / "checkpoint.hwckpt"
        path.write_bytes(checkpoint)
        try:
            ckpt = HardwareCheckpoint.load(path)
        except CheckpointError as err:  # name what the client sent, not our temp file
            raise CheckpointError(str(err).replace(str(path), UPLOAD_NAME)) from err
    return compile_checkpoint(ckpt, notes=notes).to_bytes()


class BadRequest(ValueError):
    """A Compile call whose messages are not options-then-data."""


def read_compile_requests(requests: Iterable[compiler_pb2.CompileRequest]) -> tuple[str, bytes]:
    """(notes, checkpoint bytes) of a Compile call: options first, if at all, then the data chunks."""
    notes, received = "", bytearray()
    for request in requests:
        if request.WhichOneof("part") == "options":
            if received:
                raise BadRequest("options must come before checkpoint_data")
            notes = request.options.notes
        else:
            received += request.checkpoint_data
    BYTES_IN.inc(len(received))
    if not received:
        raise BadRequest("no checkpoint_data received")
    return notes, bytes(received)


class CompilerServicer(compiler_pb2_grpc.CompilerServicer):
    def Compile(
        self, request_iterator: Iterable[compiler_pb2.CompileRequest], context: grpc.ServicerContext
    ) -> Iterator[program_pb2.ProgramChunk]:
        try:
            notes, checkpoint = read_compile_requests(request_iterator)
            started = time.perf_counter()
            program = compile_bytes(checkpoint, notes)
        except (BadRequest, CheckpointError, CompileError) as err:
            COMPILES.labels(outcome="invalid").inc()
            log_event(log, "compile_rejected", logging.WARNING, reason=str(err))
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:
            COMPILES.labels(outcome="error").inc()
            log.exception("compile failed")
            abort(context, grpc.StatusCode.INTERNAL, f"compile failed: {type(err).__name__}: {err}")
        seconds = time.perf_counter() - started
        COMPILES.labels(outcome="ok").inc()
        COMPILE_SECONDS.observe(seconds)
        log_event(
            log, "compiled", bytes_in=len(checkpoint), bytes_out=len(program), seconds=round(seconds, 3)
        )
        for chunk in iter_chunks(program):
            BYTES_OUT.inc(len(chunk))
            yield program_pb2.ProgramChunk(data=chunk)

    def Inspect(
        self, request_iterator: Iterable[program_pb2.ProgramChunk], context: grpc.ServicerContext
    ) -> program_pb2.ProgramInfo:
        data = b"".join(chunk.data for chunk in request_iterator)
        BYTES_IN.inc(len(data))
        try:
            info = Program.from_bytes(data, where="program").info()
        except ProgramError as err:
            INSPECTS.labels(outcome="invalid").inc()
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        INSPECTS.labels(outcome="ok").inc()
        return program_info_to_proto(info)


def serve(
    host: Annotated[
        str, typer.Option(envvar=f"{ENV_PREFIX}HOST", help="address to serve gRPC and /metrics on")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar=f"{ENV_PREFIX}PORT", min=0, help="gRPC port (0: any free port)")
    ] = 50052,
    metrics_port: Annotated[
        int,
        typer.Option(
            envvar=f"{ENV_PREFIX}METRICS_PORT", min=0, help="Prometheus /metrics port (0: any free port)"
        ),
    ] = 9092,
    log_level: Annotated[
        LogLevel,
        typer.Option(envvar=f"{ENV_PREFIX}LOG_LEVEL", case_sensitive=False, help="least severe level logged"),
    ] = LogLevel.INFO,
) -> None:
    """Serve gharial.v1.Compiler: hardware checkpoints in, programs out. Stops gracefully on SIGTERM."""
    configure_logging("compiler", log_level.value)
    server = GrpcServer("compiler", host, port)
    server.add_service(compiler_pb2_grpc.add_CompilerServicer_to_server, CompilerServicer(), SERVICE_NAME)
    server.start(metrics_port=metrics_port)
    server.run_until_signal()


def main() -> None:
    typer.run(serve)


if __name__ == "__main__":
    main()
