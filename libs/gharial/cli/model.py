"""`gharial model ...`: inspect model architectures."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gharial.asr.config import FRAME_MS, ModelConfig, load_model_config, named_configs
from gharial.asr.model import RNNT, count_parameters

app = typer.Typer(help="Inspect model architectures.", no_args_is_help=True)


def architecture_summary(cfg: ModelConfig) -> dict[str, object]:
    """Exact parameter counts per component plus the shapes that define the architecture."""
    model = RNNT(cfg)
    return {
        "name": cfg.name,
        "params": count_parameters(model),
        "components": {
            "encoder.pre_rnn": count_parameters(model.encoder.pre_rnn),
            "encoder.post_rnn": count_parameters(model.encoder.post_rnn),
            "predictor": count_parameters(model.predictor),
            "joint": count_parameters(model.joint),
        },
        "vocab_size": cfg.vocab_size,
        "blank_id": cfg.blank_id,
        "frame_ms": FRAME_MS,
        "feature_dim": cfg.features.feature_dim,
        "features": cfg.features.model_dump(),
        "encoder": cfg.encoder.model_dump(),
        "predictor": cfg.predictor.model_dump(),
        "joint": cfg.joint.model_dump(),
        "max_symbols_per_step": cfg.max_symbols_per_step,
    }


@app.command()
def info(
    config: Annotated[
        str,
        typer.Option(help=f"a named config ({', '.join(named_configs())}) or the path of a model YAML file"),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
) -> None:
    """Print a model's architecture and exact parameter count."""
    try:
        cfg = load_model_config(config)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err), param_hint="--config") from err
    summary = architecture_summary(cfg)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    enc, pred, feat = cfg.encoder, cfg.predictor, cfg.features
    components: dict[str, int] = summary["components"]  # type: ignore[assignment]
    rows = [
        (
            "features",
            f"{feat.n_mels} mels x {feat.stack} = {feat.feature_dim} dims / {feat.hop_ms * feat.stack:g} ms",
            None,
        ),
        ("pre-RNN", f"{enc.pre_rnn_layers} x LSTM({enc.hidden})", components["encoder.pre_rnn"]),
        ("StackTime", f"x{enc.stack_time} → {FRAME_MS} ms frames", None),
        ("post-RNN", f"{enc.post_rnn_layers} x LSTM({enc.hidden})", components["encoder.post_rnn"]),
        (
            "predictor",
            f"embed({cfg.vocab_size}) + {pred.layers} x LSTM({pred.hidden})",
            components["predictor"],
        ),
        ("joint", f"{cfg.joint.hidden} hidden → {cfg.vocab_size} tokens + blank", components["joint"]),
    ]
    lines = [f"model {cfg.name}: {summary['params']:,} parameters"]
    lines += [f"  {name:<10} {what:<42} {'' if n is None else f'{n:,}':>12}" for name, what, n in rows]
    typer.echo("\n".join(lines))
