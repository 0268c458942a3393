"""`gharial transcribe`: offline transcription of an audio file on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gharial.asr.checkpoint import CheckpointError
from gharial.asr.level import AUTO_GAIN_HELP, DEFAULT_AUTO_GAIN
from gharial.asr.pipeline import SpeechToText
from gharial.audio import load_audio


def transcribe(
    audio: Annotated[
        Path, typer.Argument(help="audio file (WAV/FLAC/OGG, any rate; mixed to mono, resampled)")
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="hardware checkpoint to use; default: the bundled model in models/")
    ] = None,
    beam: Annotated[int, typer.Option(min=1, help="beam width; 1 decodes greedily")] = 1,
    auto_gain: Annotated[bool, typer.Option("--auto-gain/--no-auto-gain", help=AUTO_GAIN_HELP)] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help='print {"transcript", "tokens", "seconds"} as one JSON object')
    ] = False,
) -> None:
    """Transcribe one audio file offline with a hardware checkpoint."""
    try:
        recognizer = SpeechToText.load(
            checkpoint, beam_width=beam, auto_gain=DEFAULT_AUTO_GAIN if auto_gain else None
        )
        result = recognizer.transcribe(load_audio(audio, recognizer.features.cfg.sample_rate))
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(result.model_dump_json() if as_json else result.transcript)
