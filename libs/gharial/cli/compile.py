"""`gharial compile`: hardware checkpoint → program for the accelerator card (DESIGN §3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def compile_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="HW_CKPT", help="hardware checkpoint to compile")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PROGRAM", help="program file to write")],
    notes: Annotated[str, typer.Option(help="free text stored in the program's metadata")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the program info as JSON")] = False,
) -> None:
    """Compile a hardware checkpoint into a program (int16 weights; the same input gives the same bytes)."""
    from gharial.accelerator.compiler import compile_checkpoint
    from gharial.asr.checkpoint import HardwareCheckpoint

    try:
        program = compile_checkpoint(HardwareCheckpoint.load(checkpoint), notes=notes)
        program.save(output)
    except ValueError as err:  # CheckpointError, CompileError, ProgramError
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    info = program.info()
    if as_json:
        typer.echo(json.dumps(info.model_dump()))
        return
    typer.echo(
        "\n".join(
            [
                f"wrote            {output}",
                f"architecture     {info.architecture}",
                f"weights          {info.weight_bytes / 1e6:.2f} MB",
                f"state per stream {info.state_bytes_per_stream} bytes",
                f"MACs per frame   {info.macs_per_frame:,}",
                f"sha256           {info.program_sha256}",
            ]
        )
    )
