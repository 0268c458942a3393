"""Exponential moving average of the weights: the copy that gets validated and exported."""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class EMA(Generic[M]):
    """ema ← d·ema + (1−d)·weights after each step, with d ramped up from 0 early in training so the
    average is not dominated by the random initial weights: d = min(decay, (1+step)/(10+step))."""

    def __init__(self, model: M, decay: float) -> None:
        self.decay = decay
        self.model: M = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.mul_(d).add_(p.detach(), alpha=1 - d)
