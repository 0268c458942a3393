"""The accelerator emulator service: one process = one card (`gharial.v1.Accelerator` over gRPC).

    gharial-emulator --card-id card-0 [--program en-small.prog] [--mode compute|timing-only] [--paced]

The card itself (state memory, batching, arithmetic, timing) is `gharial.accelerator.card.Card`;
this module only speaks gRPC for it and runs the process: health checking, `/metrics`, JSON logs
and a graceful SIGTERM (waiting frames are answered STREAM_CLOSED, open RunFrames calls end with
UNAVAILABLE, then the server stops).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import grpc
import torch
import typer

from gharial.accelerator.card import BATCH_WINDOW_MS, Card, CardError, CardMode, FrameOutcome
from gharial.accelerator.profile import load_profile
from gharial.accelerator.program import ProgramError
from gharial.accelerator.wire import program_info_to_proto
from gharial.plumbing.grpc_server import GrpcServer
from gharial.plumbing.logs import configure_logging, log_event
from gharial.protos import accelerator_pb2 as pb
from gharial.protos import accelerator_pb2_grpc, program_pb2

log = logging.getLogger(__name__)

_MODES = {"compute": pb.CARD_MODE_COMPUTE, "timing_only": pb.CARD_MODE_TIMING_ONLY}
_SHUTDOWN = object()  # put on every open RunFrames call's queue when the card shuts down
_REQUESTS_DONE = object()  # the client half-closed its side of a RunFrames call


class AcceleratorServicer(accelerator_pb2_grpc.AcceleratorServicer):
    def __init__(self, card: Card) -> None:
        self.card = card
        self._calls: set[queue.Queue[object]] = set()
        self._calls_lock = threading.Lock()

    def GetCardInfo(self, request: pb.GetCardInfoRequest, context: grpc.ServicerContext) -> pb.CardInfo:
        card, info = self.card, self.card.program_info
        return pb.CardInfo(
            card_id=card.card_id,
            profile=card.profile.name,
            mode=_MODES[card.mode],
            paced=card.paced,
            program=program_info_to_proto(info) if info is not None else None,
            streams_open=card.streams_open,
            max_streams=card.max_streams,
            state_memory_bytes=card.profile.state_memory_bytes,
            state_memory_used_bytes=card.state_memory_used,
            batch_window_ms=BATCH_WINDOW_MS,
        )

    def LoadProgram(
        self, request_iterator: Iterator[program_pb2.ProgramChunk], context: grpc.ServicerContext
    ) -> pb.LoadProgramReply:
        data = b"".join(chunk.data for chunk in request_iterator)
        try:
            info = self.card.load_program(data, where="uploaded program")
        except ProgramError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.LoadProgramReply(program=program_info_to_proto(info), max_streams=self.card.max_streams)

    def OpenStream(self, request: pb.OpenStreamRequest, context: grpc.ServicerContext) -> pb.OpenStreamReply:
        try:
            stream_id = self.card.open_stream(
                max_symbols=request.max_symbols_per_frame or None,
                encoder_mode=request.decode_mode == pb.DECODE_MODE_ENCODER,
            )
        except CardError as e:
            _abort(context, grpc.StatusCode[e.code], str(e))
        info = self.card.program_info
        return pb.OpenStreamReply(stream_id=stream_id, state_bytes=info.state_bytes_per_stream if info else 0)

    def CloseStream(
        self, request: pb.CloseStreamRequest, context: grpc.ServicerContext
    ) -> pb.CloseStreamReply:
        try:
            return pb.CloseStreamReply(frames=self.card.close_stream(request.stream_id))
        except CardError as e:
            _abort(context, grpc.StatusCode[e.code], str(e))

    def RunFrames(
        self, request_iterator: Iterator[pb.FrameRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.FrameResult]:
        """Frames are submitted by a reader thread as they arrive; results are yielded as the card
        delivers them. After the client half-closes, the call ends once every frame is answered."""
        results: queue.Queue[object] = queue.Queue()
        outstanding = [0]
        lock = threading.Lock()

        def deliver(outcome: FrameOutcome) -> None:
            results.put(outcome)

        def read_requests() -> None:
            try:
                for request in request_iterator:
                    with lock:
                        outstanding[0] += 1
                    self.card.submit(
                        request.stream_id, request.frame_index, request.features, request.reset_state, deliver
                    )
            except grpc.RpcError:
                pass  # the client went away; frames already submitted still complete on the card
            finally:
                results.put(_REQUESTS_DONE)

        with self._calls_lock:
            self._calls.add(results)
        threading.Thread(target=read_requests, name="run-frames-reader", daemon=True).start()
        requests_done = False
        try:
            while not (requests_done and outstanding[0] == 0):
                item = results.get()
                if item is _SHUTDOWN:
                    _abort(context, grpc.StatusCode.UNAVAILABLE, f"card {self.card.card_id} is shutting down")
                if item is _REQUESTS_DONE:
                    requests_done = True
                    continue
                assert isinstance(item, FrameOutcome)
                with lock:
                    outstanding[0] -= 1
                yield _frame_result(item)
        finally:
            with self._calls_lock:
                self._calls.discard(results)

    def shutdown(self) -> None:
        """Answer waiting frames STREAM_CLOSED, then end every open RunFrames call with UNAVAILABLE."""
        self.card.shutdown()
        with self._calls_lock:
            for call in self._calls:
                call.put(_SHUTDOWN)


def _frame_result(outcome: FrameOutcome) -> pb.FrameResult:
    result = pb.FrameResult(
        stream_id=outcome.stream_id,
        frame_index=outcome.frame_index,
        tokens=outcome.tokens,
        encoder_output=outcome.encoder_output,
        batch_id=outcome.batch_id,
        batch_size=outcome.batch_size,
        batch_cycles=outcome.batch_cycles,
        simulated_latency_ms=outcome.simulated_latency_ms,
    )
    if outcome.error:
        result.error.CopyFrom(
            pb.FrameError(code=pb.FrameErrorCode.Name(outcome.error.value), message=outcome.message)
        )
    return result


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort always raises")


def _env(flag: str) -> str:
    return f"GHARIAL_EMULATOR_{flag.upper()}"


def serve(
    card_id: Annotated[
        str, typer.Option(envvar=_env("card_id"), help="This card's unique ID (licences name it).")
    ],
    program: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("program"), help="Program file to load at start (else wait for LoadProgram)."
        ),
    ] = None,
    profile: Annotated[
        str, typer.Option(envvar=_env("profile"), help="Card profile: a bundled name or a YAML file.")
    ] = "speedster7t",
    mode: Annotated[
        str,
        typer.Option(
            envvar=_env("mode"),
            help="compute: the program's arithmetic; timing-only: the timing model alone (capacity studies).",
        ),
    ] = "compute",
    paced: Annotated[
        bool, typer.Option(envvar=_env("paced"), help="Release results at their simulated completion time.")
    ] = False,
    torch_threads: Annotated[
        int,
        typer.Option(
            min=1,
            envvar=_env("torch_threads"),
            help="Threads the program's arithmetic (compute mode) may use. 1 (the default) leaves the "
            "other cores to the host's services: torch's idle threads spin, and at a card's batch sizes "
            "a second thread saves less than it takes.",
        ),
    ] = 1,
    host: Annotated[str, typer.Option(envvar=_env("host"), help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar=_env("port"), help="gRPC port.")] = 50051,
    metrics_port: Annotated[
        int, typer.Option(envvar=_env("metrics_port"), help="Port of the Prometheus /metrics endpoint.")
    ] = 9091,
    log_level: Annotated[
        str, typer.Option(envvar=_env("log_level"), help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run one emulated accelerator card as a gRPC service."""
    configure_logging("emulator", log_level)
    torch.set_num_threads(torch_threads)
    card_mode: CardMode = "timing_only" if mode.replace("-", "_") == "timing_only" else "compute"
    if mode.replace("-", "_") not in _MODES:
        raise typer.BadParameter(f"--mode must be compute or timing-only, not {mode!r}")
    card = Card(card_id, load_profile(profile), mode=card_mode, paced=paced)
    if program is not None:
        try:
            card.load_program(program.read_bytes(), where=str(program))
        except (OSError, ProgramError) as e:
            log_event(log, "program_rejected", level=logging.ERROR, error=str(e))
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
    servicer = AcceleratorServicer(card)
    server = GrpcServer("emulator", host, port)
    server.add_service(
        accelerator_pb2_grpc.add_AcceleratorServicer_to_server, servicer, "gharial.v1.Accelerator"
    )
    server.start(metrics_port=metrics_port)
    log_event(log, "card_ready", card_id=card_id, mode=card_mode, paced=paced, port=server.port)
    server.run_until_signal(on_shutdown=servicer.shutdown)
    exit_after_clean_stop()


def exit_after_clean_stop() -> NoReturn:
    """Exit 0 once the server has stopped, skipping interpreter finalization: streams are closed and
    logged by now, and gRPC threads still unwinding cancelled streaming calls made the process abort
    (SIGABRT) during finalization once in CI, under load."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    typer.run(serve)
