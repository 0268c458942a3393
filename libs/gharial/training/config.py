"""Training configuration: one YAML file describes a whole run (model, data, schedule, augmentation).

Every field has a default documented here; `gharial train` writes the resolved `<name>_run.yaml`
(every default made explicit) into the run directory. Relative paths in a config are relative to
the config file's folder, so a recipe under `models/<name>/` works from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gharial.asr.config import ModelConfig, load_model_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    train_manifests: list[Path] = Field(
        description="training data: JSON manifests, tar shards or HF datasets"
    )
    val_manifests: list[Path] = Field(default_factory=list, description="validated every `val_every` steps")
    max_duration_s: float = Field(16.7, gt=0, description="longer training utterances are skipped")
    tokenizer: Path = Field(description="sentencepiece model (gharial data tokenizer)")
    mel_stats: Path = Field(description="per-mel mean/variance JSON (gharial data mel-stats)")
    noise_dir: Path | None = Field(None, description="folder of non-speech noise audio for background noise")
    teacher_targets: Path | None = Field(
        None,
        description="teacher store (gharial data teacher) of every training utterance, for distill_weight",
    )


class OptimConfig(_Strict):
    """AdamW (decoupled weight decay) with warmup → hold → exponential decay (CAIMAN-ASR's schedule).

    LAMB is not used: at the small batch sizes a CPU can train with, AdamW converges as well and is
    one well-tested torch optimizer fewer to maintain."""

    lr: float = Field(1.5e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-5, ge=0, description="warmup starts here; decay never goes below it")
    warmup_steps: int = Field(300, ge=0)
    hold_steps: int = Field(3000, ge=0)
    half_life_steps: int = Field(2000, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the weights that get exported")


class AugmentConfig(_Strict):
    """Each augmentation with its CAIMAN-ASR default (0 / off where the docs say it is off)."""

    speed_perturbation: tuple[float, float] | None = Field(
        (0.85, 1.15), description="resample by a uniform factor in [min, max]; null turns it off"
    )
    spec_freq_masks: int = Field(2, ge=0)
    spec_max_freq: int = Field(20, ge=0, description="widest frequency mask, in mel bins")
    spec_time_masks: int = Field(10, ge=0)
    spec_max_time: float = Field(0.03, ge=0, le=1, description="widest time mask, fraction of the utterance")
    prob_background_noise: float = Field(0.25, ge=0, le=1)
    prob_babble_noise: float = Field(0.0, ge=0, le=1)
    prob_train_narrowband: float = Field(0.0, ge=0, le=1)
    gain_db: tuple[float, float] | None = Field(
        None,
        description="change every utterance's level by a uniform draw in [min, max] dB, after the "
        "other audio augmentations (samples clipped to [-1, 1] as an ADC would); teaches the model "
        "quiet and loud microphones; null (the default) turns it off",
    )
    prob_join: float = Field(
        0.0,
        ge=0,
        le=1,
        description="chance that a batch's utterances are joined in pairs, each pair one example with "
        "a pause of join_gap_s between; teaches the model speech that follows speech, as in a live "
        "stream (a model trained only on single utterances is 13 points worse there)",
    )
    join_gap_s: tuple[float, float] = Field((0.0, 0.5), description="pause between joined utterances, s")
    noise_initial_low: float = Field(30.0, description="SNR range (dB) before and during the delay")
    noise_initial_high: float = 60.0
    noise_delay_steps: int = Field(4896, ge=0)
    noise_ramp_steps: int = Field(4896, ge=0)
    rsp_seq_len_freq: list[float] = Field(
        [99.0, 0.0, 1.0],
        description="random state passing: how often to start from the state of 0, 1, 2... batches ago",
    )
    rsp_delay: int | None = Field(
        None, description="first step with RSP; default: after 3 half-lives of decay"
    )
    token_sampling: float = Field(
        0.05, ge=0, le=1, description="fraction of transcripts tokenized by sampling"
    )
    grad_noise: float = Field(0.0, ge=0, description="initial std of Gaussian gradient noise (encoder only)")
    grad_noise_start: int | None = Field(None, description="step it starts; default: the end of warmup")
    delay_penalty: float = Field(0.0, ge=0, description="per-frame penalty on late token emission")


class TrainConfig(_Strict):
    name: str
    model: str | ModelConfig = Field(
        description="named model config, a model YAML path, or the config inline"
    )
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    global_batch_size: int = Field(32, gt=0, description="utterances per optimizer step")
    grad_accumulation_batches: int = Field(1, gt=0, description="micro-batches accumulated per step")
    batch_split_factor: int = Field(1, gt=0, description="joint/loss split of each micro-batch")
    training_steps: int = Field(20000, gt=0)
    ctc_weight: float = Field(
        0.3, ge=0, description="auxiliary CTC loss over the tokenizer's pieces on the encoder output"
    )
    character_ctc_weight: float = Field(
        0.0,
        ge=0,
        description="auxiliary CTC loss over letters, apostrophe and space (CHARSET) on the pre-RNN "
        "output, whose 30 ms frames are dense enough for letters: each label is frequent, so the "
        "lower layers learn acoustics soon even on little data",
    )
    ctc_warmup_steps: int = Field(
        0,
        ge=0,
        description="first steps train only the encoder and CTC heads, on the CTC losses: the "
        "encoder learns acoustics before the prediction network can learn the transcripts by heart",
    )
    rnnt_prune_range: int = Field(
        0,
        ge=0,
        description="0: the RNN-T loss over the whole (frame, token) lattice. N >= 2: pruned RNN-T "
        "(gharial.asr.pruned_loss): a simple additive joint picks, per frame, the N token positions "
        "that matter and the real joint runs only there, so the joint and loss cost N/(U+1) of the "
        "full lattice's",
    )
    simple_loss_weight: float = Field(
        0.5,
        ge=0,
        description="with rnnt_prune_range: weight of the simple joint's own RNN-T loss, which trains "
        "the heads that choose the windows (the pruned loss has weight 1)",
    )
    distill_weight: float = Field(
        0.0,
        ge=0,
        description="distillation: a linear head on the encoder output regresses the teacher's frames "
        "(data.teacher_targets; loss 1 − cosine per frame, summed), a dense acoustic target",
    )
    distill_delay_frames: int = Field(
        2,
        ge=0,
        description="encoder frame t + delay predicts teacher frame t: the teacher saw the whole "
        "utterance, our streaming encoder only the past",
    )
    seed: int = 1
    save_every: int = Field(250, gt=0, description="steps between checkpoints (last 3 kept, best kept)")
    keep_every: int | None = Field(
        None,
        gt=0,
        description="checkpoints at multiples of this step are never pruned, so a learning curve "
        "can be validated after the run; null keeps only the last 3",
    )
    val_every: int = Field(1000, gt=0)
    val_utterances: int | None = Field(
        None, description="validate on the first N utterances of each manifest"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a CUDA GPU when there is one")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast mixed precision (CPU or GPU)"
    )
    freeze_encoder: bool = False
    fine_tune_from: Path | None = Field(
        None,
        description="start from this training checkpoint's EMA weights (not its optimizer or step), "
        "or from a hardware checkpoint (.hwckpt) with the same model config and tokenizer",
    )
    threads: int = Field(2, gt=0, description="torch CPU threads")
    data_workers: int = Field(
        1, gt=0, description="processes making batches ahead of the trainer (a GPU needs many)"
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        per_batch, rest = divmod(self.global_batch_size, self.grad_accumulation_batches)
        if rest or per_batch % self.batch_split_factor:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must divide into grad_accumulation_batches "
                f"{self.grad_accumulation_batches} x batch_split_factor {self.batch_split_factor}"
            )
        return self

    @model_validator(mode="after")
    def _prune_range_has_room(self) -> TrainConfig:
        if self.rnnt_prune_range == 1:
            raise ValueError(
                "rnnt_prune_range must be 0 (whole lattice) or at least 2 (a token and the next)"
            )
        return self

    @model_validator(mode="after")
    def _warmup_has_a_ctc_loss(self) -> TrainConfig:
        if self.ctc_warmup_steps and not (self.ctc_weight or self.character_ctc_weight):
            raise ValueError("ctc_warmup_steps needs ctc_weight or character_ctc_weight above 0")
        return self

    @model_validator(mode="after")
    def _distillation_has_targets(self) -> TrainConfig:
        if self.distill_weight and self.data.teacher_targets is None:
            raise ValueError("distill_weight needs data.teacher_targets (gharial data teacher)")
        if self.distill_weight and self.augment.prob_join:
            raise ValueError(
                "augment.prob_join cannot be used with distillation (teacher frames are per utterance)"
            )
        return self

    @property
    def batch_size(self) -> int:
        """Utterances per forward pass through the encoder (per micro-batch)."""
        return self.global_batch_size // self.grad_accumulation_batches

    def architecture(self) -> ModelConfig:
        """The model config, loaded if `model` names one."""
        return self.model if isinstance(self.model, ModelConfig) else load_model_config(self.model)

    def resolved(self) -> dict[str, Any]:
        """Every setting, defaults included, with the model config inlined: what `<name>_run.yaml` holds."""
        data = self.model_dump(mode="json")
        data["model"] = self.architecture().model_dump(mode="json")
        return data


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, key and line."""


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a training YAML; relative paths are resolved against its folder. Errors name file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
        node = yaml.compose(text)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: config file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping")
    _resolve_paths(raw, path.parent)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        line = _line_of(node, loc)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {'.'.join(loc)}: {first['msg']}") from err


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train_manifests", "val_manifests"):
            if isinstance(data.get(key), list):
                data[key] = [str(base / p) for p in data[key]]
        for key in ("tokenizer", "mel_stats", "noise_dir", "teacher_targets"):
            if isinstance(data.get(key), str):
                data[key] = str(base / data[key])
    model = raw.get("model")
    if isinstance(model, str) and model.endswith((".yaml", ".yml")):
        raw["model"] = str(base / model)
    if isinstance(raw.get("fine_tune_from"), str):
        raw["fine_tune_from"] = str(base / raw["fine_tune_from"])


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """1-based line of the deepest key of `loc` that exists in the YAML document."""
    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == key), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
