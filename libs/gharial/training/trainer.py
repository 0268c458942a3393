"""The training loop: one obvious loop over optimizer steps, with checkpoints that resume exactly.

Each optimizer step sees `global_batch_size` utterances in `grad_accumulation_batches` micro-batches;
each micro-batch runs the encoder and prediction network once and the joint + loss in
`batch_split_factor` slices (the joint's [B, T, U, V] lattice is what runs out of memory). The loss
is RNN-T plus auxiliary CTC losses (over tokens on the encoder output, over letters on the pre-RNN
output), which get training off the "blank
plateau" far sooner on small data. Data order and augmentation are functions of (seed, step), and
checkpoints hold the step, so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from gharial.asr.checkpoint import HardwareCheckpoint
from gharial.asr.config import ModelConfig
from gharial.asr.features import FeatureExtractor, MelStats
from gharial.asr.loss import rnnt_loss
from gharial.asr.model import RNNT, EncoderState, LSTMState
from gharial.asr.pruned_loss import pruned_rnnt_loss
from gharial.asr.text import CHARSET, normalize_transcript
from gharial.asr.tokenizer import Tokenizer
from gharial.data.manifest import ManifestError, Utterance, require_audio_files
from gharial.data.readers import read_utterances
from gharial.data.teacher import TeacherStore
from gharial.training.batch import CHARACTER_BLANK, Batch, BatchMaker
from gharial.training.batches import batch_at
from gharial.training.checkpoint import TrainingCheckpoint, TrainingCheckpointMeta
from gharial.training.config import TrainConfig
from gharial.training.ema import EMA
from gharial.training.schedule import fit_schedule, learning_rate

log = logging.getLogger("gharial.train")
KEEP_CHECKPOINTS = 3
BUDGET_WARMUP_STEPS = 10  # not timed when fitting a time budget: workers start, caches fill
# After this many timed steps the schedule is fitted to the budget, and fitted again later: the first
# steps run while the batch workers still start, so later fits see the steadier speed.
BUDGET_FIT_AFTER = (30, 200, 1000)
BUDGET_RESERVE = 0.05  # of the budget kept free for the last checkpoint and slower steps later
NOISE_SUFFIXES = (".wav", ".flac", ".ogg")
GRAD_NOISE_DECAY = 0.55
DISTILL_HEAD = "distill_head."
SIMPLE_HEADS = "simple_"  # simple_am_head., simple_lm_head.: the pruned loss's simple joint
TEACHER_FRAME_SLACK = 2  # frames a store's utterance may differ from its duration (rounding, padding)


class TrainingModel(nn.Module):
    """The RNN-T plus the heads used only in training (never exported): CTC over the tokenizer's
    pieces on the encoder output, CTC over CHARSET on the pre-RNN output, when distilling a linear
    map from the encoder output to the teacher's frames, and with the pruned RNN-T loss the simple
    joint's two halves (encoder and prediction network outputs → token logits)."""

    def __init__(self, cfg: ModelConfig, teacher_dim: int | None = None, pruned: bool = False) -> None:
        super().__init__()
        self.rnnt = RNNT(cfg)
        self.ctc_head = nn.Linear(cfg.encoder.hidden, cfg.vocab_size + 1)
        self.character_ctc_head = nn.Linear(cfg.encoder.hidden, len(CHARSET) + 1)
        self.distill_head = None if teacher_dim is None else nn.Linear(cfg.encoder.hidden, teacher_dim)
        self.simple_am_head = nn.Linear(cfg.encoder.hidden, cfg.vocab_size + 1) if pruned else None
        self.simple_lm_head = nn.Linear(cfg.predictor.hidden, cfg.vocab_size + 1) if pruned else None

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load a training checkpoint's weights; the distillation and simple-joint heads are optional
        on both sides (a run may start from one without them, and an export never needs them)."""
        heads = {DISTILL_HEAD: self.distill_head, SIMPLE_HEADS: self.simple_am_head}
        optional = tuple(prefix for prefix, head in heads.items() if head is None)
        state = {k: v for k, v in state.items() if not k.startswith(optional)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith((DISTILL_HEAD, SIMPLE_HEADS))]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing}, unexpected keys {unexpected}")


def load_training_data(cfg: TrainConfig) -> list[Utterance]:
    """Every training utterance no longer than max_duration_s; refuses empty transcripts and missing audio."""
    utterances = []
    for manifest in cfg.data.train_manifests:
        for utt in read_utterances(manifest):
            if not normalize_transcript(utt.transcript):
                raise ManifestError(f"{manifest}: utterance {utt.id} has an empty transcript")
            if utt.duration <= cfg.data.max_duration_s:
                utterances.append(utt)
    require_audio_files(utterances)
    if not utterances:
        raise ManifestError("no training utterances (check train_manifests and max_duration_s)")
    return utterances


def require_teacher_frames(teacher: TeacherStore, utterances: list[Utterance]) -> None:
    """Distillation needs every training utterance in the teacher store, with as many frames as its
    audio lasts (a store left from an earlier corpus of the same ids would silently misalign)."""
    rebuild = "rebuild it with `gharial data teacher` over every train manifest"
    missing = [u.id for u in utterances if u.id not in teacher.index.utterances]
    if missing:
        raise ValueError(
            f"{teacher.folder}: no teacher frames for {len(missing)} training utterances "
            f"(e.g. {missing[0]!r}); {rebuild}"
        )
    frame_s = teacher.index.frame_ms / 1000
    for utt in utterances:
        frames = teacher.index.utterances[utt.id][1]
        if utt.duration and abs(frames - utt.duration / frame_s) > TEACHER_FRAME_SLACK:
            raise ValueError(
                f"{teacher.folder}: utterance {utt.id!r} lasts {utt.duration:.2f} s but has {frames} "
                f"teacher frames of {teacher.index.frame_ms} ms: the store is stale; {rebuild}"
            )


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The training device; bf16 on a GPU without bf16 support is refused rather than emulated."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA GPU")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision: bf16 is not supported by this GPU; use fp32")
    return device


def write_run_config(cfg: TrainConfig, run_dir: Path) -> Path:
    """`<name>_run.yaml`: the config with every default written out and the model config inlined."""
    path = run_dir / f"{cfg.name}_run.yaml"
    path.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    return path


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        self.model_cfg = cfg.architecture()
        self.tokenizer_bytes = cfg.data.tokenizer.read_bytes()
        self.tokenizer = Tokenizer.from_bytes(self.tokenizer_bytes)
        if self.tokenizer.vocab_size != self.model_cfg.vocab_size:
            raise ValueError(
                f"{cfg.data.tokenizer}: {self.tokenizer.vocab_size} pieces, model config wants "
                f"{self.model_cfg.vocab_size}"
            )
        self.mel_stats = MelStats.model_validate_json(cfg.data.mel_stats.read_text())
        self.utterances = load_training_data(cfg)
        noise = sorted(
            p for p in (cfg.data.noise_dir or Path("/nonexistent")).rglob("*") if p.suffix in NOISE_SUFFIXES
        )
        teacher = None if cfg.data.teacher_targets is None else TeacherStore(cfg.data.teacher_targets)
        if teacher is not None:
            require_teacher_frames(teacher, self.utterances)
        self.make_batch = BatchMaker(
            FeatureExtractor(self.model_cfg.features, self.mel_stats), self.tokenizer, cfg.augment, noise,
            teacher, self.model_cfg.encoder.stack_time,
        )  # fmt: skip

        self.device = resolve_device(cfg)
        self.model = TrainingModel(
            self.model_cfg, None if teacher is None else teacher.dim, pruned=cfg.rnnt_prune_range > 0
        ).to(self.device)
        self.ema = EMA(self.model, cfg.optim.ema)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
        )
        self.step = 0
        self.audio_seconds_seen = 0.0
        self.best_wer: float | None = None
        self.rsp_history: list[EncoderState] = []
        self.distill_sum = 0.0  # of this step's distillation losses: logged apart from the total
        self.simple_sum = 0.0  # of this step's weighted simple-joint losses (pruned RNN-T), likewise
        self.prefetcher: BatchPrefetcher | None = None
        self._resume_or_fine_tune()
        if cfg.freeze_encoder:
            for p in self.model.rnnt.encoder.parameters():
                p.requires_grad_(False)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> TrainingCheckpoint:
        return TrainingCheckpoint(
            TrainingCheckpointMeta(
                config=self.cfg,
                step=self.step,
                audio_seconds_seen=self.audio_seconds_seen,
                best_wer=self.best_wer,
            ),
            model=self.model.state_dict(),
            ema=self.ema.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            tokenizer_model=self.tokenizer_bytes,
            mel_stats=self.mel_stats,
            rsp_history=[[x for part in state for x in part] for state in self.rsp_history],
        )

    def save(self) -> Path:
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        self.checkpoint().save(path)
        for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-KEEP_CHECKPOINTS]:
            if not self._kept_for_good(old):
                old.unlink()
        return path

    def _kept_for_good(self, path: Path) -> bool:
        step = int(path.stem.removeprefix("step_"))
        return self.cfg.keep_every is not None and step % self.cfg.keep_every == 0

    def latest_checkpoint(self) -> Path | None:
        saved = sorted(self.ckpt_dir.glob("step_*.pt"))
        return saved[-1] if saved else None

    def _resume_or_fine_tune(self) -> None:
        latest = self.latest_checkpoint()
        if latest is not None:
            ckpt = TrainingCheckpoint.load(latest)
            self.model.load_state_dict(ckpt.model)
            self.ema.model.load_state_dict(ckpt.ema)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.step, self.audio_seconds_seen = ckpt.meta.step, ckpt.meta.audio_seconds_seen
            self.best_wer = ckpt.meta.best_wer
            self.rsp_history = [EncoderState(LSTMState(*s[:2]), LSTMState(*s[2:])) for s in ckpt.rsp_history]
            log.info(json.dumps({"event": "resumed", "checkpoint": str(latest), "step": self.step}))
        elif self.cfg.fine_tune_from is not None:
            self._start_from(self.cfg.fine_tune_from)
            self.ema.model.load_state_dict(self.model.state_dict())
            log.info(json.dumps({"event": "fine_tune", "from": str(self.cfg.fine_tune_from)}))

    def _start_from(self, path: Path) -> None:
        """Fine-tuning starts from a training checkpoint's EMA weights, CTC heads included, or from a
        hardware checkpoint (`.hwckpt`, e.g. the bundled model), whose RNN-T must match this run's
        model config (dropout aside) and tokenizer; the CTC heads then start fresh, as an exported
        model has none."""
        if path.suffix != ".hwckpt":
            self.model.load_weights(TrainingCheckpoint.load(path).ema)
            return
        exported = HardwareCheckpoint.load(path)
        if not exported.config.same_weights_as(self.model_cfg):
            raise ValueError(
                f"{path}: its model config {exported.config.name!r} differs from this run's "
                f"{self.model_cfg.name!r} (fine-tuning keeps the architecture)"
            )
        if exported.tokenizer_model != self.tokenizer_bytes:
            raise ValueError(f"{path}: its tokenizer differs from {self.cfg.data.tokenizer}")
        self.model.rnnt.load_state_dict(exported.state_dict)

    def hardware_checkpoint(self) -> HardwareCheckpoint:
        """The EMA weights as a hardware checkpoint (what `gharial export` writes)."""
        return HardwareCheckpoint.from_model(
            self.ema.model.rnnt, self.mel_stats, self.tokenizer_bytes, training_step=self.step,
            source=f"gharial train {self.cfg.name}",
        )  # fmt: skip

    # -- one step ----------------------------------------------------------------------------------
    def micro_batch(self, position: int) -> Batch:
        if self.prefetcher is None:
            self.prefetcher = BatchPrefetcher(
                self.make_batch, self.utterances, self.cfg.batch_size, self.cfg.seed, self.cfg.data_workers
            )
        return self.prefetcher.get(position)

    def loss(self, batch: Batch, initial_state: EncoderState | None) -> tuple[Tensor, EncoderState]:
        """Summed loss of one micro-batch: RNN-T + the weighted CTC losses (the CTC losses alone
        during the CTC warm-up); backward runs here, slice by slice."""
        cfg, rnnt = self.cfg, self.model.rnnt
        stack = self.model_cfg.encoder.stack_time
        batch = batch.to(self.device)
        below, enc, final_state = rnnt.encoder.forward_layers(batch.features, initial_state)
        final_state = EncoderState(*(type(s)(*(x.detach() for x in s)) for s in final_state))
        enc_lengths = torch.div(batch.feature_lengths + stack - 1, stack, rounding_mode="floor")
        if self.step < cfg.ctc_warmup_steps:
            ctc = self.token_ctc_loss(enc, enc_lengths, batch) + self.character_ctc_loss(below, batch)
            ctc = ctc + self.distill_loss(enc, enc_lengths, batch)
            (ctc / cfg.global_batch_size).backward()
            return ctc.detach(), final_state
        sos = batch.targets.new_full((batch.targets.shape[0], 1), rnnt.blank_id)
        pred, _ = rnnt.predictor(torch.cat([sos, batch.targets], 1))
        # Slices of the joint reuse encoder/predictor outputs through detached leaves, whose
        # gradients are then pushed through the encoder and predictor in one backward pass.
        enc_leaf, pred_leaf = enc.detach().requires_grad_(), pred.detach().requires_grad_()
        total = torch.zeros((), device=self.device)
        for rows in torch.arange(len(enc), device=self.device).chunk(cfg.batch_split_factor):
            part = self.transducer_loss(enc_leaf, enc_lengths, pred_leaf, batch, rows)
            (part / cfg.global_batch_size).backward()
            total += part.detach()
        token_ctc = self.token_ctc_loss(enc_leaf, enc_lengths, batch)
        token_ctc = token_ctc + self.distill_loss(enc_leaf, enc_lengths, batch)
        if token_ctc.requires_grad:
            (token_ctc / cfg.global_batch_size).backward()  # into enc_leaf.grad, pushed on below
        character_ctc = self.character_ctc_loss(below, batch)  # reads the pre-RNN: joins that pass
        roots, grads = [enc, pred], [enc_leaf.grad, pred_leaf.grad]
        if character_ctc.requires_grad:
            roots.append(character_ctc / cfg.global_batch_size)
            grads.append(torch.ones_like(character_ctc))
        torch.autograd.backward(roots, grads)
        return total + token_ctc.detach() + character_ctc.detach(), final_state

    def transducer_loss(
        self, enc: Tensor, enc_lengths: Tensor, pred: Tensor, batch: Batch, rows: Tensor
    ) -> Tensor:
        """Summed RNN-T loss of the batch's `rows`: over the whole lattice, or pruned
        (rnnt_prune_range) plus simple_loss_weight × the simple joint's loss."""
        cfg, rnnt = self.cfg, self.model.rnnt
        t_max, u_max = int(enc_lengths[rows].max()), int(batch.target_lengths[rows].max())
        enc, pred = enc[rows, :t_max], pred[rows, : u_max + 1]
        targets, t_len, u_len = batch.targets[rows, :u_max], enc_lengths[rows], batch.target_lengths[rows]
        if not cfg.rnnt_prune_range:
            logits = rnnt.joint(enc, pred).float()
            return rnnt_loss(
                logits, targets, t_len, u_len, rnnt.blank_id, reduction="sum",
                delay_penalty=cfg.augment.delay_penalty,
            )  # fmt: skip
        assert self.model.simple_am_head is not None and self.model.simple_lm_head is not None
        simple, pruned = pruned_rnnt_loss(
            rnnt.joint, enc, pred, self.model.simple_am_head(enc), self.model.simple_lm_head(pred), targets,
            t_len, u_len, rnnt.blank_id, cfg.rnnt_prune_range, cfg.augment.delay_penalty,
        )  # fmt: skip
        weighted_simple = cfg.simple_loss_weight * simple.sum()
        self.simple_sum += float(weighted_simple.detach())
        return pruned.sum() + weighted_simple

    def token_ctc_loss(self, enc: Tensor, enc_lengths: Tensor, batch: Batch) -> Tensor:
        """ctc_weight × the summed CTC loss over tokens on the encoder output enc [B, T, H]
        (a constant 0 when the weight is 0)."""
        if not self.cfg.ctc_weight:
            return enc.new_zeros(())
        logits = self.model.ctc_head(enc)
        loss = _ctc(logits, enc_lengths, batch.targets, batch.target_lengths, self.model.rnnt.blank_id)
        return self.cfg.ctc_weight * loss

    def distill_loss(self, enc: Tensor, enc_lengths: Tensor, batch: Batch) -> Tensor:
        """distill_weight × Σ over valid frames of (1 − cosine) between the distillation head's
        output at encoder frame t + delay and the teacher's frame t (a constant 0 without it)."""
        head, delay = self.model.distill_head, self.cfg.distill_delay_frames
        if not self.cfg.distill_weight or head is None or batch.teacher is None:
            return enc.new_zeros(())
        predicted = head(enc[:, delay:])
        target = batch.teacher[:, : predicted.shape[1]]
        frames = torch.arange(target.shape[1], device=enc.device)
        valid = frames[None, :] < (enc_lengths - delay)[:, None]
        distance = 1 - F.cosine_similarity(predicted[:, : target.shape[1]].float(), target, dim=-1)
        loss = self.cfg.distill_weight * (distance * valid).sum()
        self.distill_sum += float(loss.detach())
        return loss

    def character_ctc_loss(self, below: Tensor, batch: Batch) -> Tensor:
        """character_ctc_weight × the summed CTC loss over CHARSET on the pre-RNN output below
        [B, T·stack_time, H] (a constant 0 when the weight is 0)."""
        if not self.cfg.character_ctc_weight:
            return below.new_zeros(())
        logits = self.model.character_ctc_head(below)
        loss = _ctc(logits, batch.feature_lengths, batch.characters, batch.character_lengths, CHARACTER_BLANK)
        return self.cfg.character_ctc_weight * loss

    def rsp_state(self, batch_size: int, rng: random.Random) -> EncoderState | None:
        """Random state passing: sometimes start from the final state of an earlier batch."""
        a = self.cfg.augment
        delay = a.rsp_delay if a.rsp_delay is not None else self.default_rsp_delay()
        if self.step < delay or not self.rsp_history:
            return None
        back = rng.choices(range(len(a.rsp_seq_len_freq)), weights=a.rsp_seq_len_freq)[0]
        if back == 0 or back > len(self.rsp_history):
            return None
        state = self.rsp_history[-back]
        return state if state.pre.h.shape[1] == batch_size else None

    def default_rsp_delay(self) -> int:
        """After the learning rate has decayed to 1/8 of its peak (three half-lives)."""
        o = self.cfg.optim
        return o.warmup_steps + o.hold_steps + 3 * o.half_life_steps

    def add_grad_noise(self, rng: torch.Generator) -> None:
        """σ = noise / (1 + t − t0)^0.55 Gaussian noise on the encoder's gradients, from step t0."""
        a = self.cfg.augment
        start = a.grad_noise_start if a.grad_noise_start is not None else self.cfg.optim.warmup_steps
        if not a.grad_noise or self.step < start or self.cfg.freeze_encoder:
            return
        sigma = a.grad_noise / (1 + self.step - start) ** GRAD_NOISE_DECAY
        for p in self.model.rnnt.encoder.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn(p.grad.shape, generator=rng).to(p.grad.device) * sigma)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = learning_rate(self.step, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rng = random.Random(f"{cfg.seed}/step/{self.step}")
        loss_sum, seconds, utterances = 0.0, 0.0, 0
        self.distill_sum = self.simple_sum = 0.0
        self.model.train()
        for micro in range(cfg.grad_accumulation_batches):
            batch = self.micro_batch(self.step * cfg.grad_accumulation_batches + micro)
            with self.autocast():
                loss, final_state = self.loss(batch, self.rsp_state(len(batch.features), rng))
            self.rsp_history = ([*self.rsp_history, final_state])[-len(cfg.augment.rsp_seq_len_freq) :]
            loss_sum += float(loss)
            seconds += batch.audio_seconds
            utterances += len(batch.features)
        self.add_grad_noise(torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        self.step += 1
        self.audio_seconds_seen += seconds
        stats = {"loss": loss_sum / utterances, "lr": lr, "grad_norm": grad_norm, "audio_seconds": seconds}
        if cfg.distill_weight:
            stats["distill_loss"] = self.distill_sum / utterances  # included in "loss"
        if cfg.rnnt_prune_range and self.step > cfg.ctc_warmup_steps:
            stats["simple_loss"] = self.simple_sum / utterances  # included in "loss"
        return stats

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the loop ----------------------------------------------------------------------------------
    def train(
        self,
        steps: int | None = None,
        validate: Any = None,
        profile_steps: int = 0,
        time_budget_s: float | None = None,
    ) -> None:
        """Train until `training_steps` (or `steps` more steps); checkpoint every `save_every`.

        validate: callable(HardwareCheckpoint) → WER, run every `val_every` steps when given.
        time_budget_s: finish within this many seconds. The steps are timed (from BUDGET_WARMUP_STEPS
        past the start and past the CTC warm-up) and the schedule is fitted to the steps that fit
        (`fit_schedule`, training_steps at most) after BUDGET_FIT_AFTER of them; the loop also
        stops at the deadline itself.
        """
        run_started = time.perf_counter()
        deadline = None if time_budget_s is None else run_started + (1 - BUDGET_RESERVE) * time_budget_s
        # The CTC warm-up's steps are far cheaper than the RNN-T's: timing starts after it.
        first_timed_step = max(self.step, self.cfg.ctc_warmup_steps) + BUDGET_WARMUP_STEPS
        timing_started = 0.0
        end = self.cfg.training_steps if steps is None else min(self.cfg.training_steps, self.step + steps)
        limit = end  # a time budget only ever shortens the run
        write_run_config(self.cfg, self.run_dir)
        writer = _tensorboard(self.run_dir / "tensorboard")
        log_file = (self.run_dir / "train_log.jsonl").open("a")
        bar = tqdm(total=end, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True)
        try:
            with _profiler(self.run_dir, profile_steps) as profiler:
                while self.step < end and (deadline is None or time.perf_counter() < deadline):
                    started = time.perf_counter()
                    if self.step == first_timed_step:
                        timing_started = started
                    timed = self.step - first_timed_step
                    if deadline is not None and timed in BUDGET_FIT_AFTER:
                        end = self._fit_to_budget(deadline, (started - timing_started) / timed, limit)
                        bar.total = end
                        bar.refresh()
                    stats = self.train_step()
                    stats["audio_seconds_per_second"] = stats["audio_seconds"] / (
                        time.perf_counter() - started
                    )
                    if profiler is not None:
                        profiler.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}",
                                    rt=f"{stats['audio_seconds_per_second']:.0f}x")  # fmt: skip
                    record = {
                        "event": "step",
                        "step": self.step,
                        **{k: round(v, 6) for k, v in stats.items()},
                    }
                    log_file.write(json.dumps(record) + "\n")
                    for key, value in stats.items():
                        writer.add_scalar(f"train/{key}", value, self.step)
                    if validate is not None and self.step % self.cfg.val_every == 0:
                        self._validate(validate, writer, log_file)
                    if self.step % self.cfg.save_every == 0 or self.step == end:
                        self.save()
                    log_file.flush()
                if self.step % self.cfg.save_every and self.step != end:  # stopped by the deadline
                    self.save()
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()
                self.prefetcher = None
            bar.close()
            writer.close()
            log_file.close()

    def _fit_to_budget(self, deadline: float, seconds_per_step: float, limit: int) -> int:
        """Fit training_steps (never past `limit`) and the schedule to the time left; returns the
        new last step."""
        left = max(deadline - time.perf_counter(), 0.0)
        end = min(self.step + max(int(left / seconds_per_step), 1), limit)
        self.cfg = fit_schedule(self.cfg, end)
        write_run_config(self.cfg, self.run_dir)
        log.info(json.dumps({
            "event": "time_budget", "seconds_per_step": round(seconds_per_step, 4),
            "training_steps": end, "hold_steps": self.cfg.optim.hold_steps,
            "half_life_steps": self.cfg.optim.half_life_steps,
        }))  # fmt: skip
        return end

    def _validate(self, validate: Any, writer: Any, log_file: Any) -> None:
        wer = float(validate(self.hardware_checkpoint()))
        writer.add_scalar("val/wer", wer, self.step)
        log_file.write(json.dumps({"event": "validation", "step": self.step, "wer": wer}) + "\n")
        if self.best_wer is None or wer < self.best_wer:
            self.best_wer = wer
            self.checkpoint().save(self.ckpt_dir / "best.pt")
            self.hardware_checkpoint().save(self.run_dir / "best.hwckpt")


def _ctc(logits: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
    """Summed CTC loss of logits [B, T, labels]; utterances too dense to align count 0."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(
        log_probs, targets, lengths, target_lengths, blank=blank, reduction="sum", zero_infinity=True
    )


class BatchPrefetcher:
    """Makes the next batches in worker processes while the current one trains. Batches are pure
    functions of their position, so prefetching changes nothing but the speed."""

    def __init__(
        self,
        make_batch: BatchMaker,
        utterances: list[Utterance],
        batch_size: int,
        seed: int,
        workers: int = 1,
    ) -> None:
        self.ahead = 2 * workers  # keeps every worker busy while the trainer consumes in order
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_batch_worker,
            initargs=(make_batch, utterances, batch_size, seed),
        )
        self.pending: dict[int, concurrent.futures.Future[Batch]] = {}

    def get(self, position: int) -> Batch:
        for p in list(self.pending):
            if p < position:  # a jump (e.g. a test calling out of order): drop stale work
                self.pending.pop(p).cancel()
        for p in range(position, position + self.ahead + 1):
            if p not in self.pending:
                self.pending[p] = self.pool.submit(_make_batch_at, p)
        return self.pending.pop(position).result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


_worker: dict[str, Any] = {}


def _init_batch_worker(
    make_batch: BatchMaker, utterances: list[Utterance], batch_size: int, seed: int
) -> None:
    torch.set_num_threads(1)
    # The worker holds its task queue's write end itself, so it never sees EOF when the trainer is
    # killed (SIGKILL, OOM killer): without this it would wait forever, holding the utterance list.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _worker.update(make_batch=make_batch, utterances=utterances, batch_size=batch_size, seed=seed)
    _worker["durations"] = [u.duration for u in utterances]


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(0)


def _make_batch_at(position: int) -> Batch:
    w = _worker
    indices = batch_at(w["durations"], w["batch_size"], w["seed"], position)
    return w["make_batch"]([w["utterances"][i] for i in indices], position, w["seed"])


class _NullWriter:
    def add_scalar(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(path: Path) -> Any:
    """A TensorBoard writer, or one that drops everything when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(json.dumps({"event": "no_tensorboard", "hint": "pip install tensorboard"}))
        return _NullWriter()
    return SummaryWriter(str(path))


@contextlib.contextmanager
def _profiler(run_dir: Path, steps: int) -> Iterator[Any]:
    """torch.profiler over the first `steps` steps; the table goes to run_dir/profile.txt."""
    if steps <= 0:
        yield None
        return

    def write_table(prof: torch.profiler.profile) -> None:
        (run_dir / "profile.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        )

    schedule = torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(schedule=schedule, on_trace_ready=write_table) as prof:
        yield prof
