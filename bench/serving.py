"""Serving capacity: how many real-time streams the local stack (`gharial up`, one card) holds on
this machine, what the gateway adds to frame latency, and the memory an open stream costs.

Per backend (cpu, accelerator = emulated card), against a fresh `LocalStack`:

  capacity   the performance client (`gharial perf`, in this process) drives N perpetual real-time
             streams for --seconds at N = 1, 2, 4, 8, 16, 32, 48, 64, 80, … (STEPS) up to
             --max-streams; a point passes when p99 frame latency ≤ 100 ms, no response is
             dropped, no stream errs and every stream keeps real time. The first failure stops
             the sweep; capacity is the largest passing N. --streams measures given N instead.
  cost       CPU ms per stream-second of audio of each process (gateway, transcriber, emulator,
             and this one, the client) at each point: robust to other work on the machine, and
             the sum bounds the capacity (cores × 1000 / sum streams at most).
  overhead   at --overhead-streams streams: p99 (and p50) frame latency through the gateway minus
             the same through the transcriber's gRPC Transcribe called directly (a small driver
             here, same audio, same pacing).
  memory     RSS (/proc/PID/status VmRSS) of the gateway and transcriber (and emulator) processes
             idle, and mid-run at each point: (RSS at N − idle RSS) / N per stream.

Run:  .venv/bin/python bench/serving.py [--backend cpu|accelerator|both] [--seconds 20]
Results: a table, and bench/results/serving.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from machine import machine_info
from rich.console import Console
from rich.table import Table

from gharial.clients.perf import Audio, PerfConfig, PerfReport, Stats, run_perf
from gharial.gateway.framing import FRAME_SECONDS
from gharial.protos import transcriber_pb2, transcriber_pb2_grpc
from gharial.stack import Backend, LocalStack

RESULTS = Path(__file__).parent / "results" / "serving.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_AUDIO = REPO_ROOT / "clients" / "examples" / "cathy-arctic-b0460.flac"
# Utterances of many lengths, so streams start and end at different moments as independent
# clients' do; streams all looping one file would open and close together every few seconds.
SPEECH_DEV_AUDIO = REPO_ROOT.parent / "shared" / "data" / "speech-dev" / "audio"

STEPS = [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 192, 224, 256, 320, 384, 512]
P99_LIMIT_MS = 100.0


def default_audio() -> list[Path]:
    """speech-dev's recordings when they are here, else the bundled example."""
    return sorted(SPEECH_DEV_AUDIO.glob("*.wav")) or [EXAMPLE_AUDIO]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_cpu(stack: LocalStack) -> dict[str, float]:
    """CPU seconds used so far by each service process and by this one (the performance client)."""
    used = {s.name: cpu_seconds(s.process.pid) for s in stack.services if s.name != "license"}
    return {**used, "client": time.process_time()}


def stack_rss(stack: LocalStack) -> dict[str, float]:
    """MiB per service process (redis left out: it holds no stream state)."""
    return {s.name: round(rss_mib(s.process.pid), 1) for s in stack.services if s.name != "license"}


async def _direct_stream(
    stub: transcriber_pb2_grpc.TranscriberStub, audio: Audio, stop: asyncio.Event, latencies: array[float]
) -> None:
    """One stream straight to the transcriber, paced like the perf client: latency per frame."""
    loop = asyncio.get_running_loop()
    sent_at = array("d", bytes(8 * len(audio.frames)))
    await asyncio.sleep(random.uniform(0.0, FRAME_SECONDS))
    while not stop.is_set():

        async def requests() -> AsyncIterator[transcriber_pb2.TranscribeRequest]:
            yield transcriber_pb2.TranscribeRequest(config=transcriber_pb2.StreamConfig(stream_id="bench"))
            start = loop.time()
            for i, frame in enumerate(audio.frames):
                await asyncio.sleep(max(0.0, start + i * FRAME_SECONDS - loop.time()))
                sent_at[i] = loop.time()
                yield transcriber_pb2.TranscribeRequest(audio=frame)
            yield transcriber_pb2.TranscribeRequest(end_of_stream=True)

        async for response in stub.Transcribe(requests()):
            if response.frame_index < len(audio.frames):
                latencies.append(loop.time() - sent_at[response.frame_index])


async def direct_latency(address: str, inputs: list[Audio], streams: int, seconds: float) -> Stats:
    stop = asyncio.Event()
    latencies: array[float] = array("d")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = transcriber_pb2_grpc.TranscriberStub(channel)
        tasks = [
            asyncio.create_task(_direct_stream(stub, inputs[i % len(inputs)], stop, latencies))
            for i in range(streams)
        ]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    return Stats.of(latencies)


async def perf_point(stack: LocalStack, inputs: list[Audio], streams: int, seconds: float) -> dict[str, Any]:
    """One sweep point; RSS is sampled half way, when every stream is open."""
    host, port = stack.gateway_address
    config = PerfConfig(host=host, port=port, connections=streams, perpetual=True, duration=seconds)
    sample: dict[str, dict[str, float]] = {}
    asyncio.get_running_loop().call_later(seconds / 2, lambda: sample.update(rss=stack_rss(stack)))
    cpu_before = stack_cpu(stack)
    report: PerfReport = await run_perf(inputs, config)
    cpu_used = {name: used - cpu_before[name] for name, used in stack_cpu(stack).items()}
    # CPU cost per real-time stream: ms of CPU per second of audio served, each process apart. Unlike
    # latency it hardly changes when other work shares the cores, and its sum bounds the capacity:
    # cores × 1000 / total streams at most.
    stream_seconds = streams * seconds
    cpu_ms = {name: round(1000 * used / stream_seconds, 2) for name, used in cpu_used.items()}
    passed = (
        report.latency.p99_ms is not None
        and report.latency.p99_ms <= P99_LIMIT_MS
        and report.dropped_responses == 0
        and report.errors == 0
        and report.streams_held == streams
    )
    return {
        "streams": streams,
        "passed": passed,
        "rss_mib": sample.get("rss", {}),
        "cpu_ms_per_stream_second": cpu_ms,
        **report.model_dump(),
    }


def bench_backend(
    backend: Backend,
    inputs: list[Audio],
    stream_counts: list[int],
    seconds: float,
    overhead_streams: int,
    stop_at_failure: bool = True,
) -> dict[str, Any]:
    console = Console()
    stack = LocalStack(cards=1, backend=backend, gateway_port=0)
    stack.up()
    try:
        time.sleep(1.0)
        idle = stack_rss(stack)
        transcriber = next(s for s in stack.services if s.name.startswith("transcriber"))
        direct = asyncio.run(direct_latency(transcriber.address, inputs, overhead_streams, seconds))
        via_gateway = asyncio.run(perf_point(stack, inputs, overhead_streams, seconds))
        points = []
        for streams in stream_counts:
            point = asyncio.run(perf_point(stack, inputs, streams, seconds))
            points.append(point)
            lat = point["latency"]
            console.print(
                f"{backend} N={streams}: p50 {lat['p50_ms']} p99 {lat['p99_ms']} max {lat['max_ms']} ms,"
                f" held {point['streams_held']}, dropped {point['dropped_responses']},"
                f" errors {point['errors']}, client lag p99 {point['loop_lag']['p99_ms']} ms,"
                f" client CPU {point['client_cpu_percent']}%, CPU ms per stream-second"
                f" {point['cpu_ms_per_stream_second']} → {'pass' if point['passed'] else 'FAIL'}"
            )
            if stop_at_failure and not point["passed"]:
                break
    finally:
        stack.down()
    passing = [p for p in points if p["passed"]]
    top = passing[-1] if passing else None
    per_stream = (
        {name: round(1024 * (mib - idle[name]) / top["streams"], 1) for name, mib in top["rss_mib"].items()}
        if top
        else {}
    )
    gateway_latency = via_gateway["latency"]
    return {
        "backend": backend,
        "max_realtime_streams": top["streams"] if top else 0,
        "overhead": {
            "streams": overhead_streams,
            "direct": direct.model_dump(),
            "gateway": gateway_latency,
            "added_p50_ms": _diff(gateway_latency["p50_ms"], direct.p50_ms),
            "added_p99_ms": _diff(gateway_latency["p99_ms"], direct.p99_ms),
        },
        "rss_idle_mib": idle,
        "kib_per_stream": per_stream,
        "points": points,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def main(
    backend: Annotated[str, typer.Option(help="cpu, accelerator (the emulated card) or both")] = "both",
    max_streams: Annotated[int, typer.Option(min=1, help="largest stream count tried")] = 512,
    seconds: Annotated[float, typer.Option(min=1.0, help="wall seconds per point")] = 20.0,
    streams: Annotated[
        list[int] | None,
        typer.Option(
            help="measure only these stream counts (repeat the flag), each whether or not the one "
            "before passed: for comparing CPU cost per stream at a fixed load"
        ),
    ] = None,
    overhead_streams: Annotated[
        int, typer.Option(min=1, help="streams for the gateway-overhead comparison (a light load)")
    ] = 4,
    audio: Annotated[
        list[Path] | None,
        typer.Option(
            help="audio files streamed (repeat the flag); default: every speech-dev recording (68 "
            "utterances of 2-5 s), or the bundled example where speech-dev is missing"
        ),
    ] = None,
) -> None:
    """Serving capacity, gateway overhead and memory per stream of the local stack."""
    choices: dict[str, list[Backend]] = {"cpu": ["cpu"], "accelerator": ["accelerator"]}
    choices["both"] = ["cpu", "accelerator"]
    if backend not in choices:
        raise typer.BadParameter("one of cpu, accelerator, both", param_hint="--backend")
    backends = choices[backend]
    inputs = [Audio.load(path) for path in (audio or default_audio())]
    counts = sorted(streams) if streams else [n for n in STEPS if n <= max_streams]
    results = [bench_backend(b, inputs, counts, seconds, overhead_streams, not streams) for b in backends]
    table = Table(
        title=f"serving capacity: p99 ≤ {P99_LIMIT_MS:.0f} ms, no drops ({seconds:.0f} s per point)"
    )
    columns = ["backend", "real-time streams", "p99 at max (ms)", "gateway +p50/+p99 (ms)", "KiB/stream"]
    for column in [*columns, "CPU ms per stream-second at max"]:
        table.add_column(column)
    for r in results:
        top = next((p for p in reversed(r["points"]) if p["passed"]), None)
        overhead = r["overhead"]
        table.add_row(
            r["backend"],
            str(r["max_realtime_streams"]),
            str(top["latency"]["p99_ms"]) if top else "-",
            f"{overhead['added_p50_ms']} / {overhead['added_p99_ms']}",
            ", ".join(f"{k} {v}" for k, v in r["kib_per_stream"].items()),
            ", ".join(f"{k} {v}" for k, v in top["cpu_ms_per_stream_second"].items()) if top else "-",
        )
    Console().print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"machine": machine_info(), "seconds": seconds, "results": results}, indent=1)
    )


if __name__ == "__main__":
    typer.run(main)
