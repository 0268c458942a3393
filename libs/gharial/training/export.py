"""Training checkpoint → hardware checkpoint: the EMA RNN-T weights and what the host needs around them."""

from __future__ import annotations

from pathlib import Path

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.decoding.lm import NgramLM
from gharial.training.checkpoint import TrainingCheckpoint, TrainingCheckpointError
from gharial.training.trainer import TrainingModel


def export_checkpoint(ckpt: TrainingCheckpoint, ngram_lm: Path | None = None) -> HardwareCheckpoint:
    model = TrainingModel(ckpt.meta.config.architecture())
    try:
        model.load_weights(ckpt.ema)
    except RuntimeError as err:  # shapes or names that do not match the checkpoint's own config
        raise TrainingCheckpointError(f"EMA weights do not fit the model config: {err}") from err
    lm_bytes = None
    if ngram_lm is not None:
        lm_bytes = ngram_lm.read_bytes()
        NgramLM.from_bytes(lm_bytes)  # refuse an LM that would fail only when a stream first uses it
    hw = HardwareCheckpoint.from_model(
        model.rnnt, ckpt.mel_stats, ckpt.tokenizer_model, ngram_lm=lm_bytes, training_step=ckpt.meta.step,
        source=f"gharial train {ckpt.meta.config.name}",
    )  # fmt: skip
    hw.validate()
    return hw
