"""Training checkpoints: everything needed to continue a run exactly, or to export its EMA weights.

A training checkpoint is a torch file holding plain tensors and one JSON metadata string (loaded
with `weights_only=True`, so opening one never runs code):

    {"meta": TrainingCheckpointMeta JSON, "model": state dict, "ema": state dict,
     "optimizer": state dict, "tokenizer_model": bytes-as-uint8, "mel_stats": JSON,
     "rsp_history": [[pre.h, pre.c, post.h, post.c] of each recent final encoder state]}

`rsp_history` (random state passing's source states) is optional: a checkpoint without it resumes
with an empty history.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from gharial.asr.features import MelStats
from gharial.files import atomic_write
from gharial.training.config import TrainConfig

FORMAT_VERSION = 1


class TrainingCheckpointMeta(BaseModel):
    format: str = "gharial-training-checkpoint"
    format_version: int = FORMAT_VERSION
    config: TrainConfig
    step: int
    audio_seconds_seen: float = 0.0
    best_wer: float | None = None


class TrainingCheckpointError(ValueError):
    """A training checkpoint that cannot be used; the message names the file and the problem."""


class TrainingCheckpoint:
    def __init__(
        self,
        meta: TrainingCheckpointMeta,
        model: dict[str, torch.Tensor],
        ema: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
        tokenizer_model: bytes,
        mel_stats: MelStats,
        rsp_history: list[list[torch.Tensor]] | None = None,
    ) -> None:
        self.meta = meta
        self.model = model
        self.ema = ema
        self.optimizer = optimizer
        self.tokenizer_model = tokenizer_model
        self.mel_stats = mel_stats
        self.rsp_history = rsp_history or []

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file, then rename): a run killed mid-save leaves the old file."""
        with atomic_write(path) as f:
            torch.save(
                {
                    "meta": self.meta.model_dump_json(),
                    "model": self.model,
                    "ema": self.ema,
                    "optimizer": self.optimizer,
                    "tokenizer_model": torch.frombuffer(bytearray(self.tokenizer_model), dtype=torch.uint8),
                    "mel_stats": self.mel_stats.model_dump_json(),
                    "rsp_history": self.rsp_history,
                },
                f,
            )

    def slim(self) -> TrainingCheckpoint:
        """The EMA weights alone, with the model config written inline: what export and fine-tuning
        need, a quarter of the size (no raw weights, no optimizer state, no RSP history)."""
        config = self.meta.config.model_copy(update={"model": self.meta.config.architecture()})
        return TrainingCheckpoint(
            self.meta.model_copy(update={"config": config}), {}, self.ema, {}, self.tokenizer_model,
            self.mel_stats,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainingCheckpoint:
        path = Path(path)
        if not path.exists():
            raise TrainingCheckpointError(f"{path}: training checkpoint not found")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for truncated/corrupt files
            raise TrainingCheckpointError(f"{path}: not a readable training checkpoint ({err})") from err
        missing = {"meta", "model", "ema", "optimizer", "tokenizer_model", "mel_stats"} - set(raw)
        if missing:
            raise TrainingCheckpointError(f"{path}: training checkpoint lacks {sorted(missing)}")
        try:
            meta = TrainingCheckpointMeta.model_validate_json(raw["meta"])
            stats = MelStats.model_validate_json(raw["mel_stats"])
        except ValidationError as err:
            raise TrainingCheckpointError(f"{path}: bad metadata: {err.errors()[0]['msg']}") from err
        if meta.format_version != FORMAT_VERSION:
            raise TrainingCheckpointError(
                f"{path}: format version {meta.format_version}, this Gharial reads {FORMAT_VERSION}"
            )
        return cls(
            meta, raw["model"], raw["ema"], raw["optimizer"], raw["tokenizer_model"].numpy().tobytes(), stats,
            raw.get("rsp_history", []),
        )  # fmt: skip
