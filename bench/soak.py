"""Soak: the local stack (`gharial up`, one card) under N perpetual real-time streams for minutes,
to catch what a short benchmark cannot: memory or file descriptors that creep up, and responses
dropped or streams failing only after a while.

One `LocalStack` runs consecutive windows (--minutes of --window-seconds each); a window is one
performance-client run (`run_perf`, perpetual: a stream restarts its utterance when it ends) of
--streams streams, with its drops, errors, frame latency and real-time keeping. After each window,
with its streams closed, the bench samples what the window left behind: RSS (/proc/PID/status
VmRSS) and open file descriptors (/proc/PID/fd) of each service process, and Redis used_memory
and key count.

Verdict: memory growth per minute from window 2 (the first after warm-up; window 1 when there are
only two) to the last, per process and for Redis. FAIL when any grows faster than
--max-growth-mib-per-min, or any response was dropped, or any stream errored. Streams that fall
behind real time are reported, not failed: capacity is bench/serving.py's question.

Run:  .venv/bin/python bench/soak.py [--backend cpu|accelerator] [--minutes 10] [--streams 64]
Results: a table (one row per window), a verdict line and bench/results/soak.json; exit 1 on FAIL.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from machine import machine_info
from rich.console import Console
from rich.table import Table
from serving import default_audio, stack_rss

from gharial.clients.perf import Audio, PerfConfig, run_perf
from gharial.stack import Backend, LocalStack

RESULTS = Path(__file__).parent / "results" / "soak.json"
WARMUP_WINDOWS = 1


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def leftovers(stack: LocalStack, client: redis.Redis) -> dict[str, Any]:
    """What a window leaves behind once its streams are closed: where leaks show."""
    rss = stack_rss(stack)
    memory = client.info("memory")
    return {
        "rss_mib": rss,
        "fds": {s.name: open_fds(s.process.pid) for s in stack.services if s.name in rss},
        "redis_used_mib": round(memory["used_memory"] / 2**20, 2),
        "redis_keys": client.dbsize(),
    }


def soak(
    backend: Backend,
    inputs: list[Audio],
    streams: int,
    windows: int,
    window_seconds: float,
    max_growth_mib_per_min: float,
) -> dict[str, Any]:
    """Runs the windows against one fresh stack: the results document (config, machine, a row per
    window, verdict)."""
    config = {
        "backend": backend,
        "streams": streams,
        "windows": windows,
        "window_seconds": window_seconds,
        "max_growth_mib_per_min": max_growth_mib_per_min,
        "audio": [str(a.path) for a in inputs],
    }
    machine = machine_info()
    console = Console()
    stack = LocalStack(cards=1, backend=backend, gateway_port=0)
    stack.up()
    rows = []
    try:
        host, port = stack.gateway_address
        perf = PerfConfig(
            host=host,
            port=port,
            connections=streams,
            perpetual=True,
            duration=window_seconds,
            transcripts=False,
        )
        client = redis.Redis.from_url(stack.redis_url)
        started = time.monotonic()
        for window in range(1, windows + 1):
            report = asyncio.run(run_perf(inputs, perf))
            row = {
                "window": window,
                "elapsed_s": round(time.monotonic() - started, 1),
                "expected_responses": report.frames_sent,
                "received_responses": report.frames_sent - report.dropped_responses,
                "dropped_responses": report.dropped_responses,
                "errors": report.errors,
                "error_reasons": report.error_reasons,
                "p50_ms": report.latency.p50_ms,
                "p99_ms": report.latency.p99_ms,
                "streams_behind_real_time": streams - report.streams_held,
                "utterances_completed": report.utterances_completed,
                "client_lag_p99_ms": report.loop_lag.p99_ms,
                **leftovers(stack, client),
            }
            rows.append(row)
            console.print(
                f"window {window}/{windows}: p50 {row['p50_ms']} p99 {row['p99_ms']} ms,"
                f" behind real time {row['streams_behind_real_time']}/{streams},"
                f" dropped {row['dropped_responses']}, errors {row['errors']};"
                f" RSS MiB {row['rss_mib']}, fds {row['fds']},"
                f" redis {row['redis_used_mib']} MiB / {row['redis_keys']} keys"
            )
        client.close()
    finally:
        stack.down()
    return {
        "config": config,
        "machine": machine,
        "windows": rows,
        "verdict": verdict(rows, max_growth_mib_per_min),
    }


def verdict(rows: list[dict[str, Any]], max_growth_mib_per_min: float) -> dict[str, Any]:
    """Growth from the first window after warm-up to the last (the first window grows caches and
    pools, which is no leak), and whether the soak passed."""
    base, last = rows[min(WARMUP_WINDOWS, len(rows) - 2)], rows[-1]
    minutes = (last["elapsed_s"] - base["elapsed_s"]) / 60

    def memory(row: dict[str, Any]) -> dict[str, float]:
        return {**row["rss_mib"], "redis": row["redis_used_mib"]}

    growth = {name: round((memory(last)[name] - mib) / minutes, 2) for name, mib in memory(base).items()}
    dropped = sum(r["dropped_responses"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    reasons = [f"{name} grows {g:+.2f} MiB/min" for name, g in growth.items() if g > max_growth_mib_per_min]
    reasons += [f"{dropped} responses dropped"] if dropped else []
    reasons += [f"{errors} stream errors"] if errors else []
    return {
        "passed": not reasons,
        "reasons": reasons,
        "baseline_window": base["window"],
        "last_window": last["window"],
        "growth_mib_per_min": growth,
        "fd_change": {name: last["fds"][name] - n for name, n in base["fds"].items()},
        "redis_key_change": last["redis_keys"] - base["redis_keys"],
        "dropped_responses": dropped,
        "errors": errors,
        "windows_behind_real_time": [r["window"] for r in rows if r["streams_behind_real_time"]],
    }


def print_table(document: dict[str, Any]) -> None:
    rows, result, streams = document["windows"], document["verdict"], document["config"]["streams"]
    names = list(rows[0]["rss_mib"])
    table = Table(
        title=f"soak: {streams} perpetual real-time streams (late: behind real time);"
        " memory and fds after each window"
    )
    columns = ["window", "min", "dropped / sent", "errors", "p50 / p99 ms", "late streams"]
    columns += [f"{name} MiB" for name in names] + [f"fds {' / '.join(names)}", "redis MiB / keys"]
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["window"]),
            f"{r['elapsed_s'] / 60:.1f}",
            f"{r['dropped_responses']} / {r['expected_responses']}",
            str(r["errors"]),
            f"{r['p50_ms']} / {r['p99_ms']}",
            str(r["streams_behind_real_time"]),
            *(str(r["rss_mib"][name]) for name in names),
            " / ".join(str(r["fds"][name]) for name in names),
            f"{r['redis_used_mib']} / {r['redis_keys']}",
        )
    console = Console()
    console.print(table)
    growth = ", ".join(f"{name} {g:+.2f}" for name, g in result["growth_mib_per_min"].items())
    fds = ", ".join(f"{name} {n:+d}" for name, n in result["fd_change"].items())
    span = f"window {result['baseline_window']} → {result['last_window']}"
    status = "PASS" if result["passed"] else "FAIL: " + "; ".join(result["reasons"])
    console.print(
        f"{status} — growth MiB/min ({span}): {growth}; fds {fds}; redis keys {result['redis_key_change']:+d}"
    )


def main(
    backend: Annotated[
        Backend, typer.Option(help="transcriber backend: cpu, or accelerator (the emulated card)")
    ] = "accelerator",
    minutes: Annotated[
        float,
        typer.Option(min=0.0, help="soak length; it runs minutes x 60 / window-seconds windows, at least 2"),
    ] = 10.0,
    window_seconds: Annotated[
        float, typer.Option(min=1.0, help="wall seconds per window: one sample of latency, memory and fds")
    ] = 60.0,
    streams: Annotated[int, typer.Option(min=1, help="perpetual real-time streams in every window")] = 64,
    max_growth_mib_per_min: Annotated[
        float,
        typer.Option(
            help="FAIL when a process's RSS (or Redis used_memory) grows faster, from window 2 to the last"
        ),
    ] = 2.0,
    audio: Annotated[
        list[Path] | None,
        typer.Option(
            help="audio files streamed (repeat the flag); default: as bench/serving.py (every "
            "speech-dev recording, else the bundled example)"
        ),
    ] = None,
    json_out: Annotated[Path, typer.Option(help="where the results JSON goes")] = RESULTS,
) -> None:
    """Soak the local stack (one card) with perpetual real-time streams in consecutive windows;
    after each window, RSS and open fds per service and Redis memory. FAIL (exit 1) on memory
    growth, dropped responses or stream errors."""
    windows = max(2, round(minutes * 60 / window_seconds))
    inputs = [Audio.load(path) for path in (audio or default_audio())]
    document = soak(backend, inputs, streams, windows, window_seconds, max_growth_mib_per_min)
    print_table(document)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(document, indent=1))
    if not document["verdict"]["passed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
