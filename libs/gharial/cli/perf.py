"""`gharial perf`: the performance client (caiman-asr-client): concurrent real-time streams against
a gateway, reporting frame latency, streams held, errors and dropped responses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from gharial.clients.perf import Audio, PerfConfig, PerfReport, Stats, run_perf


def _stats_line(name: str, stats: Stats) -> str:
    if not stats.count:
        return f"{name}: no samples"
    return (
        f"{name} ms: p50 {stats.p50_ms}  p90 {stats.p90_ms}  p99 {stats.p99_ms}  max {stats.max_ms}"
        f"  ({stats.count} samples)"
    )


def _print_report(report: PerfReport, quiet: bool) -> None:
    if not quiet:
        for t in report.transcripts:
            typer.echo(f"[{t.connection}] {Path(t.file).name}: {t.transcript}")
    typer.echo(
        f"{report.connections} connections for {report.seconds} s: {report.utterances_completed} utterances,"
        f" {report.frames_sent} frames sent"
    )
    typer.echo(_stats_line("latency", report.latency))
    typer.echo(f"streams held in real time: {report.streams_held}/{report.connections}")
    typer.echo(f"dropped responses: {report.dropped_responses}")
    typer.echo(f"errors: {report.errors}")
    for reason, count in sorted(report.error_reasons.items()):
        typer.echo(f"  {count} x {reason}")
    typer.echo(_stats_line("client loop lag", report.loop_lag) + f", client CPU {report.client_cpu_percent}%")


def perf(
    inputs: Annotated[
        list[Path], typer.Argument(help="audio files (WAV/FLAC/OGG; mixed to mono, resampled to 16 kHz)")
    ],
    concurrent_connections: Annotated[
        int,
        typer.Option(min=1, help="connections driven at once; with more connections than files they wrap"),
    ] = 1,
    perpetual: Annotated[
        bool,
        typer.Option(help="loop utterances on every connection until --duration elapses or Ctrl-C"),
    ] = False,
    duration: Annotated[
        float | None,
        typer.Option(min=0.0, help="seconds to run; then streams end their audio early (default: no limit)"),
    ] = None,
    host: Annotated[str, typer.Option(help="gateway host")] = "localhost",
    port: Annotated[int, typer.Option(help="gateway port")] = 3030,
    connect_timeout: Annotated[
        float, typer.Option(min=0.0, help="seconds to wait for the gateway to accept a connection")
    ] = 15.0,
    max_latency: Annotated[
        float,
        typer.Option(min=0.0, help="seconds: a stream with a slower response did not keep real time"),
    ] = 1.0,
    quiet: Annotated[bool, typer.Option(help="do not print (or put in --json) the transcriptions")] = False,
    json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
) -> None:
    """Drive concurrent real-time streams against a Gharial gateway and report their latency."""
    try:
        audio = [Audio.load(path) for path in inputs]
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    config = PerfConfig(
        host=host,
        port=port,
        connections=concurrent_connections,
        perpetual=perpetual,
        duration=duration,
        connect_timeout=connect_timeout,
        max_latency=max_latency,
        transcripts=not quiet,
    )
    report = asyncio.run(run_perf(audio, config))
    if json:
        typer.echo(report.model_dump_json())
    else:
        _print_report(report, quiet)
    if report.errors or report.dropped_responses:
        raise typer.Exit(1)
