"""Model configuration: pydantic models loaded from YAML.

The named configs (`testing`, `base`, `large` from the CAIMAN-ASR reference, and our own small
ones) live in `gharial/asr/configs/*.yaml`; any other YAML file with the same schema works too.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"
FRAME_MS = 60  # one encoder frame = one decoder step = one accelerator frame


class StrictModel(BaseModel):
    """Base for every config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureConfig(StrictModel):
    """Log-mel front end (DESIGN §2)."""

    sample_rate: int = 16000
    preemphasis: float = 0.97
    dither: float = Field(1e-5, description="Gaussian dither added in training only")
    n_fft: int = 512
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_mels: int = 80
    stack: int = Field(3, description="mel frames stacked and subsampled into one feature")

    @property
    def window_samples(self) -> int:
        return round(self.sample_rate * self.window_ms / 1000)

    @property
    def hop_samples(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def feature_dim(self) -> int:
        return self.n_mels * self.stack


class EncoderConfig(StrictModel):
    """pre-RNN LSTM at 30 ms → StackTime → post-RNN LSTM at 60 ms."""

    pre_rnn_layers: int = 2
    post_rnn_layers: int = 3
    hidden: int = 1024
    stack_time: int = 2
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout between LSTM layers and into the post-RNN, in training only",
    )


class PredictorConfig(StrictModel):
    """Token embedding + LSTM layers over the emitted tokens."""

    hidden: int = 512
    layers: int = 2
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on token embeddings and between LSTM layers, in training only",
    )


class JointConfig(StrictModel):
    hidden: int = 512


class ModelConfig(StrictModel):
    """A whole LSTM RNN-T: front end, encoder, prediction network, joint and vocabulary."""

    name: str
    vocab_size: int = Field(description="sentencepiece vocabulary size; blank is index vocab_size")
    features: FeatureConfig = FeatureConfig()
    encoder: EncoderConfig = EncoderConfig()
    predictor: PredictorConfig = PredictorConfig()
    joint: JointConfig = JointConfig()
    max_symbols_per_step: int = Field(30, description="decoder emits at most this many tokens per frame")

    def same_weights_as(self, other: ModelConfig) -> bool:
        """Whether weights trained under one config load and mean the same under the other: equal
        but for the training-only dropout rates (fine-tuning may add or change dropout)."""
        training_only = {"encoder": {"dropout"}, "predictor": {"dropout"}}
        return self.model_dump(exclude=training_only) == other.model_dump(exclude=training_only)

    @model_validator(mode="after")
    def _frames_tile_60ms(self) -> ModelConfig:
        f = self.features
        samples_per_frame = f.sample_rate * FRAME_MS // 1000
        if f.hop_samples * f.stack * self.encoder.stack_time != samples_per_frame:
            raise ValueError(
                f"hop {f.hop_ms} ms x stack {f.stack} x stack_time {self.encoder.stack_time} "
                f"must make one {FRAME_MS} ms frame"
            )
        if f.window_samples > f.n_fft:
            raise ValueError(f"window of {f.window_samples} samples is longer than n_fft {f.n_fft}")
        return self

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    @property
    def samples_per_frame(self) -> int:
        """Audio samples in one 60 ms frame (960 at 16 kHz)."""
        return self.features.sample_rate * FRAME_MS // 1000

    @property
    def features_per_frame(self) -> int:
        """Stacked feature vectors per 60 ms frame (the pre-RNN runs this many steps)."""
        return self.encoder.stack_time


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Load a named config (`testing`, `base`, ...) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown model config {name_or_path!r}; named configs: {named_configs()}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return ModelConfig.model_validate(data)
