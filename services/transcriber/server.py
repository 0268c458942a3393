"""`gharial-transcriber`: one card worker (DESIGN §1), serving `gharial.v1.Transcriber` over gRPC.

    gharial-transcriber --cpu-backend [--checkpoint en-small.hwckpt] [--beam-width 4]
    gharial-transcriber --emulator 127.0.0.1:50051 --program en-small.prog --license-service 127.0.0.1:50053

The accelerator backend (the default) refuses to start unless the card's licence allows the
program. With `--redis-url` the worker registers itself for the gateway's load balancer. On SIGTERM
it drains: health and registration say so, new streams are refused, open ones get
`--drain-seconds` to finish and the rest end with UNAVAILABLE; then it exits 0. Every flag can
also be set as GHARIAL_TRANSCRIBER_<FLAG>, e.g. GHARIAL_TRANSCRIBER_MAX_STREAMS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from pydantic import ValidationError

from gharial.accelerator.program import Program, ProgramError
from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.decoding.beam import BeamConfig
from gharial.asr.level import AUTO_GAIN_HELP, DEFAULT_AUTO_GAIN, AutoGainConfig
from gharial.asr.pipeline import SpeechToText, bundled_checkpoint
from gharial.asr.streaming import SERVER_STREAMING, StreamingConfig
from gharial.balancer import WorkerRecord, WorkerRegistration
from gharial.plumbing.grpc_aio_server import AsyncGrpcServer
from gharial.plumbing.logs import configure_logging, log_event
from gharial.plumbing.memory import freeze_startup_objects
from gharial.protos import transcriber_pb2_grpc
from gharial.transcription.accelerator import AcceleratorBackend, CardConnection
from gharial.transcription.backend import Backend, BackendError
from gharial.transcription.cpu import DEFAULT_BATCH_WINDOW_S, CpuBackend
from gharial.transcription.license_check import LicenseUnavailable, ask_license_service, check_license_dir
from gharial.transcription.metrics import LICENSE_ALLOWED
from gharial.transcription.service import SERVICE_NAME, ServedModel, TranscriberServicer

log = logging.getLogger(__name__)

CARD_CHECK_S = 2.0  # how often an accelerator worker checks that its card answers and runs the program


class StartupError(Exception):
    """The worker cannot start; the message says why (printed, logged, exit status 2)."""


def _env(flag: str) -> str:
    return f"GHARIAL_TRANSCRIBER_{flag.upper()}"


def cpu_backend(
    checkpoint: Path | None,
    beam_width: int,
    lm_scale: float,
    streaming: StreamingConfig,
    max_streams: int,
    batch_window_s: float,
    auto_gain: AutoGainConfig | None,
) -> CpuBackend:
    try:
        ckpt = HardwareCheckpoint.load(checkpoint or bundled_checkpoint())
    except (ValueError, FileNotFoundError) as error:  # CheckpointError is a ValueError
        raise StartupError(str(error)) from error
    beam = BeamConfig(width=beam_width, lm_scale=lm_scale) if beam_width > 1 else None
    stt = SpeechToText(ckpt, beam_width=beam_width, streaming=streaming, beam=beam, auto_gain=auto_gain)
    return CpuBackend(stt, max_streams, batch_window_s)


def accelerator_backend(
    emulator: str,
    card_id: str | None,
    program_path: Path | None,
    license_service: str | None,
    license_dir: Path | None,
    public_key: Path | None,
    streaming: StreamingConfig,
    max_streams: int,
    auto_gain: AutoGainConfig | None,
) -> AcceleratorBackend:
    """Connect to the card, check its licence for the program, then make sure the card runs it."""
    if program_path is None:
        raise StartupError("the accelerator backend needs --program (make one with `gharial compile`)")
    if license_service is None and license_dir is None:
        raise StartupError("the accelerator backend needs a licence: --license-service or --license-dir")
    try:
        data = program_path.read_bytes()
        program = Program.from_bytes(data, where=program_path)
    except (OSError, ProgramError) as error:
        raise StartupError(f"program: {error}") from error
    card = CardConnection(emulator)
    try:
        info = card.info()
        if card_id is not None and info.card_id != card_id:
            raise StartupError(f"the card at {emulator} is {info.card_id!r}, not --card-id {card_id!r}")
        if license_service is not None:
            decision = ask_license_service(license_service, info.card_id, program.meta)
        else:
            assert license_dir is not None
            decision = check_license_dir(license_dir, public_key, info.card_id, program.meta)
        LICENSE_ALLOWED.labels(card_id=info.card_id, verdict=decision.verdict).set(int(decision.allowed))
        log_event(log, "license_checked", card_id=info.card_id, **decision.model_dump())
        if not decision.allowed:
            raise StartupError(f"licence refused ({decision.verdict}): {decision.reason}")
        card_streams = card.load(data, program)
    except (BackendError, LicenseUnavailable, StartupError) as error:
        card.close()
        raise StartupError(str(error)) from error
    return AcceleratorBackend(card, program, data, streaming, min(max_streams, card_streams), auto_gain)


async def watch_card(
    backend: AcceleratorBackend, server: AsyncGrpcServer, registration: WorkerRegistration | None
) -> None:
    """Every CARD_CHECK_S: while the card does not answer (or cannot get its program back), the
    worker reports NOT_SERVING and draining, so load balancers send new streams elsewhere."""
    ready = True
    while True:
        await asyncio.sleep(CARD_CHECK_S)
        now = await asyncio.to_thread(backend.card_ready)
        if now == ready:
            continue
        ready = now
        log_event(log, "card_ready" if ready else "card_lost", logging.INFO if ready else logging.WARNING,
                  card_id=backend.card.card_id)  # fmt: skip
        await server.set_serving(ready)
        if registration is not None:
            await asyncio.to_thread(registration.set_draining, not ready)


def advertised_host(host: str) -> str:
    """Where other machines reach a server bound to `host`."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::", "[::]") else host


def serve(
    cpu_backend_flag: Annotated[
        bool,
        typer.Option(
            "--cpu-backend",
            envvar=_env("cpu_backend"),
            help="Run the model on the CPU from a hardware checkpoint (no card, no licence) instead of "
            "on an accelerator card.",
        ),
    ] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("checkpoint"),
            help="CPU backend: hardware checkpoint to run; default: the bundled model in models/.",
        ),
    ] = None,
    beam_width: Annotated[
        int,
        typer.Option(
            min=1,
            envvar=_env("beam_width"),
            help="CPU backend: beam search with this many hypotheses (with the checkpoint's n-gram LM "
            "and keyword boosting); 1 decodes greedily. The accelerator backend always decodes greedily "
            "on the card: beam search there is not available in this version.",
        ),
    ] = 1,
    batch_window_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            envvar=_env("batch_window_ms"),
            help="CPU backend: a model step waits for every open stream's frame, but no frame waits "
            "longer than this (milliseconds); bigger batches hold more streams, a shorter window "
            "answers sooner.",
        ),
    ] = DEFAULT_BATCH_WINDOW_S * 1000,
    torch_threads: Annotated[
        int,
        typer.Option(
            min=1,
            envvar=_env("torch_threads"),
            help="Threads torch may use: the CPU backend's model step, and either backend's host-side "
            "features. 1 (the default) leaves the other cores to the gateway and the event loop; "
            "torch's idle threads spin, and at streaming batch sizes a second thread saves less than "
            "it takes (with the accelerator backend, features on torch's default threads cost 3-6x "
            "the CPU per stream).",
        ),
    ] = 1,
    beam_decoder: Annotated[
        bool,
        typer.Option(
            "--beam-decoder/--no-beam-decoder",
            envvar=_env("beam_decoder"),
            help="--no-beam-decoder forces greedy decoding whatever --beam-width says.",
        ),
    ] = True,
    lm_scale: Annotated[
        float,
        typer.Option(
            min=0.0,
            envvar=_env("lm_scale"),
            help="Beam search: weight of the checkpoint's n-gram LM (if any).",
        ),
    ] = BeamConfig().lm_scale,
    auto_gain: Annotated[
        bool,
        typer.Option(
            "--auto-gain/--no-auto-gain",
            envvar=_env("auto_gain"),
            help=AUTO_GAIN_HELP,
        ),
    ] = True,
    state_resets: Annotated[
        bool,
        typer.Option(
            "--state-resets/--no-state-resets",
            envvar=_env("state_resets"),
            help="Reset the model state every --sr-segment seconds (keeps long streams accurate).",
        ),
    ] = True,
    sr_segment: Annotated[
        float, typer.Option(min=0.0, envvar=_env("sr_segment"), help="State reset period in seconds.")
    ] = SERVER_STREAMING.sr_segment_s,
    sr_overlap: Annotated[
        float,
        typer.Option(
            min=0.0,
            envvar=_env("sr_overlap"),
            help="CPU backend: seconds of audio a fresh state warms up on before each reset. The "
            "accelerator resets without overlap (the card holds one state per stream).",
        ),
    ] = SERVER_STREAMING.sr_overlap_s,
    card_id: Annotated[
        str | None,
        typer.Option(
            envvar=_env("card_id"),
            help="Accelerator: the card's ID; start-up fails if the card at --emulator has another. "
            "Default: whatever card is there.",
        ),
    ] = None,
    emulator: Annotated[
        str, typer.Option(envvar=_env("emulator"), help="Accelerator: the card's gRPC address (host:port).")
    ] = "127.0.0.1:50051",
    program: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("program"),
            help="Accelerator: program file (from `gharial compile`); loaded onto the card unless it "
            "already runs it. Its mel stats and tokenizer are used on the host.",
        ),
    ] = None,
    license_service: Annotated[
        str | None,
        typer.Option(
            envvar=_env("license_service"), help="Accelerator: address of the licence service (host:port)."
        ),
    ] = None,
    license_dir: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("license_dir"),
            help="Accelerator: verify the card's licence here from this directory of *.lic files "
            "instead of asking --license-service.",
        ),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("public_key"),
            help="With --license-dir: the vendor's public key; default LICENSE_DIR/vendor.pub.",
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar=_env("redis_url"), help="Register this worker in Redis for the gateway's load balancer."
        ),
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(
            envvar=_env("worker_id"),
            help="CPU backend: the worker's ID; default cpu-<hostname>-<port>. An accelerator worker's ID "
            "is its card's.",
        ),
    ] = None,
    advertise_address: Annotated[
        str | None,
        typer.Option(
            envvar=_env("advertise_address"),
            help="Address the gateway reaches this worker at; default host:port.",
        ),
    ] = None,
    model_id: Annotated[
        str | None,
        typer.Option(
            envvar=_env("model_id"), help="Model id streams ask for; default the architecture's name."
        ),
    ] = None,
    model_version: Annotated[
        str,
        typer.Option(
            envvar=_env("model_version"), help="Model version served; streams asking for 'latest' match too."
        ),
    ] = "1",
    lang: Annotated[
        str,
        typer.Option(
            envvar=_env("lang"), help="BCP 47 language of the model; streams asking for another are refused."
        ),
    ] = "en-US",
    max_streams: Annotated[
        int,
        typer.Option(
            min=1,
            envvar=_env("max_streams"),
            help="Streams taken at once (the accelerator: at most what the card's state memory holds).",
        ),
    ] = 256,
    drain_seconds: Annotated[
        float,
        typer.Option(
            min=0.0,
            envvar=_env("drain_seconds"),
            help="On SIGTERM, how long open streams may take to finish before they end with UNAVAILABLE.",
        ),
    ] = 30.0,
    host: Annotated[str, typer.Option(envvar=_env("host"), help="Address to serve gRPC and /metrics on.")] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int, typer.Option(min=0, envvar=_env("port"), help="gRPC port (0: any free port).")
    ] = 50054,
    metrics_port: Annotated[
        int,
        typer.Option(min=0, envvar=_env("metrics_port"), help="Prometheus /metrics port (0: any free port)."),
    ] = 9094,
    log_level: Annotated[
        str, typer.Option(envvar=_env("log_level"), help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Serve gharial.v1.Transcriber: streaming transcription on an accelerator card or the CPU."""
    configure_logging("transcriber", log_level)
    try:
        streaming = StreamingConfig(sr_segment_s=sr_segment if state_resets else 0.0, sr_overlap_s=sr_overlap)
        backend: Backend
        torch.set_num_threads(torch_threads)
        gain = DEFAULT_AUTO_GAIN if auto_gain else None
        if cpu_backend_flag:
            width = beam_width if beam_decoder else 1
            window_s = batch_window_ms / 1000
            backend = cpu_backend(checkpoint, width, lm_scale, streaming, max_streams, window_s, gain)
        else:
            if beam_decoder and beam_width > 1:
                log_event(log, "beam_search_unavailable", logging.WARNING, reason="the card decodes greedily")
            backend = accelerator_backend(
                emulator,
                card_id,
                program,
                license_service,
                license_dir,
                public_key,
                streaming,
                max_streams,
                gain,
            )
    except (StartupError, ValidationError) as error:
        log_event(log, "startup_failed", logging.ERROR, reason=str(error))
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error

    served = ServedModel(model_id=model_id or backend.model.name, version=model_version, lang=lang)
    worker = WorkerOptions(
        worker_id=worker_id,
        redis_url=redis_url,
        advertise_address=advertise_address,
        host=host,
        port=port,
        metrics_port=metrics_port,
        drain_seconds=drain_seconds,
    )
    asyncio.run(run_worker(backend, served, worker))


@dataclass(frozen=True)
class WorkerOptions:
    """Where and how the worker serves (the flags that are not about the model)."""

    worker_id: str | None
    redis_url: str | None
    advertise_address: str | None
    host: str
    port: int
    metrics_port: int
    drain_seconds: float


async def run_worker(backend: Backend, served: ServedModel, options: WorkerOptions) -> None:
    """Serve until SIGTERM, registered for the load balancer when there is a Redis; then drain."""
    servicer = TranscriberServicer(backend, served, backend.max_streams)
    server = AsyncGrpcServer("transcriber", options.host, options.port)
    server.add_service(transcriber_pb2_grpc.add_TranscriberServicer_to_server, servicer, SERVICE_NAME)
    freeze_startup_objects()  # before the first stream can arrive: the collection takes ~130 ms
    await server.start(metrics_port=options.metrics_port)
    if isinstance(backend, AcceleratorBackend):
        servicer.worker_id = backend.card.card_id
    else:
        servicer.worker_id = options.worker_id or f"cpu-{socket.gethostname()}-{server.port}"
    registration = None
    if options.redis_url is not None:
        record = WorkerRecord(
            worker_id=servicer.worker_id,
            address=options.advertise_address or f"{advertised_host(options.host)}:{server.port}",
            models=[served.model_id],
            capacity=backend.max_streams,
        )
        registration = WorkerRegistration(options.redis_url, record)
        await asyncio.to_thread(registration.start)  # Redis round trips: never block the event loop
    log_event(
        log,
        "transcriber_ready",
        worker_id=servicer.worker_id,
        backend=backend.kind,
        model=served.model_id,
        version=served.version,
        max_streams=backend.max_streams,
    )
    watching = None
    if isinstance(backend, AcceleratorBackend):
        watching = asyncio.create_task(watch_card(backend, server, registration))

    async def shutdown() -> None:
        if watching is not None:
            watching.cancel()
        if registration is not None:
            await asyncio.to_thread(registration.set_draining, True)
        await servicer.drain(options.drain_seconds)
        if registration is not None:
            await asyncio.to_thread(registration.stop)
        backend.close()

    await server.run_until_signal(on_shutdown=shutdown)


def main() -> None:
    typer.run(serve)
