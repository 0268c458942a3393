"""`gharial up`: the whole stack on loopback, each service its own process (gharial.stack)."""

from __future__ import annotations

import signal
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gharial.cli.client import client
from gharial.plumbing.signals import wait_in_main_thread
from gharial.stack import LocalStack, StackError


class BackendName(StrEnum):
    ACCELERATOR = "accelerator"
    CPU = "cpu"


def up(
    cards: Annotated[
        int, typer.Option(min=1, help="card workers: emulator + transcriber pairs (cpu: transcribers)")
    ] = 1,
    backend: Annotated[
        BackendName,
        typer.Option(
            help="accelerator: emulated cards running the compiled model; cpu: the model on the CPU"
        ),
    ] = BackendName.ACCELERATOR,
    checkpoint: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="hardware checkpoint (default: the bundled model)"),
    ] = None,
    port: Annotated[int, typer.Option(help="gateway port (websocket API, demo page, /metrics)")] = 3030,
    workdir: Annotated[
        Path | None, typer.Option(help="where logs, licences and the program go (default: a new temp dir)")
    ] = None,
    then_stream: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="once up, stream this audio file and print its transcript"
        ),
    ] = None,
    exit_after_stream: Annotated[
        bool, typer.Option(help="stop the stack after --then-stream instead of staying up")
    ] = False,
) -> None:
    """Start Redis (or use $REDIS_URL), licence service, compiler, emulators, transcribers and the
    gateway on loopback; print where each listens; stop them all cleanly on Ctrl-C or SIGTERM."""
    console = Console(stderr=True)
    stack = LocalStack(cards, backend.value, checkpoint, port, workdir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"starting the stack in {stack.workdir} ...")
    if backend is BackendName.ACCELERATOR:
        console.print(
            "[yellow]development licences[/]: a throwaway vendor key was made for the emulated cards; "
            "production deployments mount real licences"
        )
    try:
        stack.up()
    except StackError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(1) from err
    try:
        table = Table(title="Gharial is up", caption=f"logs: {stack.workdir}/<service>.log")
        for column in ("service", "listening"):
            table.add_column(column)
        for row in stack.summary():
            table.add_row(*row)
        console.print(table)
        if then_stream is not None:
            try:
                host, gateway_port = stack.gateway_address
                client(then_stream, host=host, port=gateway_port, realtime=True)
            except typer.Exit as done:
                if done.exit_code:
                    console.print(f"[red]the demo stream failed (exit {done.exit_code})[/]")
        if not exit_after_stream or then_stream is None:
            console.print("stack is up; Ctrl-C stops it")
            wait_in_main_thread(stop)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping ...")
        stack.down()
        console.print("stopped")
