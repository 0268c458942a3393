"""Learning-rate schedule: linear warmup from min_lr, hold at the peak, then exponential decay."""

from __future__ import annotations

from gharial.training.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """The rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * step / cfg.warmup_steps
    decay_steps = step - cfg.warmup_steps - cfg.hold_steps
    if decay_steps <= 0:
        return cfg.lr
    return max(cfg.min_lr, cfg.lr * 0.5 ** (decay_steps / cfg.half_life_steps))
