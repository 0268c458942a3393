"""`gharial validate`: word error rate of a hardware checkpoint on labelled speech.

Decoding runs through `gharial.validation.validate`: the streaming Recognizer with every utterance
of a batch advancing in lock-step, one 60 ms frame at a time, as on a server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gharial.asr.level import AUTO_GAIN_HELP, DEFAULT_AUTO_GAIN


def validate(
    manifest: Annotated[
        list[Path],
        typer.Option(
            metavar="PATH",
            help="labelled data: a JSON manifest or any format `gharial data` reads (repeat the flag)",
        ),
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="hardware checkpoint to validate; default: the bundled model")
    ] = None,
    beam: Annotated[int, typer.Option(min=1, help="beam width; 1 decodes greedily")] = 1,
    sr_segment: Annotated[
        float, typer.Option(min=0, help="state-reset period in seconds (e.g. 15); 0: no state resets")
    ] = 0.0,
    sr_overlap: Annotated[
        float, typer.Option(min=0, help="warm-up audio before each state reset, seconds")
    ] = 3.0,
    dump_preds: Annotated[
        Path | None,
        typer.Option(help="write one JSON line per utterance: {id, reference, hypothesis, errors, words}"),
    ] = None,
    max_inputs_per_batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="encoder input values (frames x features) decoded together, default 10,000,000; "
            "lower it to save memory",
        ),
    ] = None,
    auto_gain: Annotated[bool, typer.Option("--auto-gain/--no-auto-gain", help=AUTO_GAIN_HELP)] = True,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='print {"wer", "words", "errors", "utterances", "audio_seconds", "decode_seconds", "rtf"}',
        ),
    ] = False,
) -> None:
    """Word error rate (after Whisper's English normaliser) of a checkpoint on labelled speech."""
    from gharial.asr.checkpoint import CheckpointError, HardwareCheckpoint
    from gharial.asr.pipeline import bundled_checkpoint
    from gharial.asr.streaming import StreamingConfig
    from gharial.data.manifest import Utterance, require_audio_files
    from gharial.data.readers import read_utterances
    from gharial.validation import MAX_INPUTS_PER_BATCH
    from gharial.validation import validate as run_validation

    try:
        streaming = StreamingConfig(sr_segment_s=sr_segment, sr_overlap_s=sr_overlap)
        hw = HardwareCheckpoint.load(checkpoint or bundled_checkpoint())
        utterances: list[Utterance] = []
        for path in manifest:
            utterances += read_utterances(path)
        require_audio_files(utterances)
        if not utterances:
            raise ValueError(f"no utterances in {', '.join(map(str, manifest))}")
        result = run_validation(
            hw, utterances, beam_width=beam, streaming=streaming,
            max_inputs_per_batch=max_inputs_per_batch or MAX_INPUTS_PER_BATCH,
            progress=not as_json and sys.stderr.isatty(),
            auto_gain=DEFAULT_AUTO_GAIN if auto_gain else None,
        )  # fmt: skip
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    if dump_preds is not None:
        dump_preds.parent.mkdir(parents=True, exist_ok=True)
        dump_preds.write_text("".join(r.model_dump_json() + "\n" for r in result.results), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result.model_dump(exclude={"results"})))
        return
    typer.echo(
        "\n".join(
            [
                f"utterances  {result.utterances}",
                f"words       {result.words}",
                f"errors      {result.errors}",
                f"WER         {100 * result.wer:.2f}%",
                f"audio       {result.audio_seconds:.1f} s",
                f"decoding    {result.decode_seconds:.1f} s (RTF {result.rtf:.3f})",
            ]
        )
    )
