"""`gharial train` and `gharial export`: training runs, and their checkpoints made hardware checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from gharial.training.checkpoint import TrainingCheckpoint, TrainingCheckpointError


def train(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="training YAML (see gharial.training.config)")
    ],
    run_dir: Annotated[
        Path | None, typer.Option(help="where checkpoints, logs and <name>_run.yaml go; default runs/<name>")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="stop after this many more steps (default: to training_steps)")
    ] = None,
    profile: Annotated[int, typer.Option(min=0, help="profile this many steps with torch.profiler")] = 0,
    time_budget: Annotated[
        float | None,
        typer.Option(
            min=60,
            help="wall-clock seconds for the whole run: the speed of the first steps decides how many "
            "steps fit (training_steps at most), and hold and decay are scaled to end inside the budget "
            "(for a lent GPU with fixed time)",
        ),
    ] = None,
) -> None:
    """Train (or resume: a run directory with checkpoints continues exactly where it stopped)."""
    from gharial.data.manifest import ManifestError
    from gharial.training.config import ConfigError, load_train_config
    from gharial.training.trainer import Trainer

    # force: an import may have configured the root logger already (seen on a GPU image)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        cfg = load_train_config(config)
        trainer = Trainer(cfg, run_dir or Path("runs") / cfg.name)
        validate = None
        if cfg.data.val_manifests:  # validation pulls in the decoders (and KenLM): only when used
            from gharial.validation import validation_function

            validate = validation_function(cfg)
    except (ConfigError, ManifestError, TrainingCheckpointError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    trainer.train(steps=steps, validate=validate, profile_steps=profile, time_budget_s=time_budget)


def export(
    checkpoint: Annotated[Path, typer.Argument(help="training checkpoint (runs/<name>/checkpoints/*.pt)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="hardware checkpoint to write (.hwckpt)")],
    ngram_lm: Annotated[
        Path | None, typer.Option(help="KenLM n-gram LM (ARPA or binary) to embed for beam decoding")
    ] = None,
) -> None:
    """EMA weights + mel stats + tokenizer (+ n-gram LM) + config → a hardware checkpoint."""
    from gharial.training.export import export_checkpoint

    try:
        hw = export_checkpoint(TrainingCheckpoint.load(checkpoint), ngram_lm)
    except (TrainingCheckpointError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    hw.save(out)
    typer.echo(f"wrote {out} (step {hw.meta.training_step}, checksum {hw.checksum[:12]})")
