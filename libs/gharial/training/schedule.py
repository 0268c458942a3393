"""Learning-rate schedule: linear warmup from min_lr, hold at the peak, then exponential decay."""

from __future__ import annotations

from gharial.training.config import OptimConfig, TrainConfig

HOLD_FRACTION = 0.4  # of the RNN-T steps after the warmups, when a schedule is fitted to a time budget
DECAY_HALF_LIVES = 4  # the rest decays over this many half-lives: the last rate is lr / 16


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """The rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * step / cfg.warmup_steps
    decay_steps = step - cfg.warmup_steps - cfg.hold_steps
    if decay_steps <= 0:
        return cfg.lr
    return max(cfg.min_lr, cfg.lr * 0.5 ** (decay_steps / cfg.half_life_steps))


def fit_schedule(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """The config with `training_steps` = total_steps and hold and decay scaled to fill them (warmup
    kept): what a run with a wall-clock budget uses once it knows how many steps fit. The rate holds
    through a CTC warm-up and then for HOLD_FRACTION of the RNN-T steps, so the decay spans the steps
    that train the whole model however long the warm-up is."""
    start = max(cfg.optim.warmup_steps, cfg.ctc_warmup_steps)
    span = max(total_steps - start, 1)
    hold = round(HOLD_FRACTION * span)
    optim = cfg.optim.model_copy(
        update={
            "hold_steps": start - cfg.optim.warmup_steps + hold,
            "half_life_steps": max(round((span - hold) / DECAY_HALF_LIVES), 1),
        }
    )
    return cfg.model_copy(update={"training_steps": total_steps, "optim": optim})
