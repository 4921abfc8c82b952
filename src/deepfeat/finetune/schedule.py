"""The learning-rate schedule of a fine-tuning stage (also used by the metric-learning
head re-fit)."""

from __future__ import annotations

import math

import torch


class Schedule:
    """Learning-rate factor per iteration of a stage: cosine to 0, step decay every
    ``step_iters``, or constant; optional linear warm-up. Pure function of the
    iteration, so resuming only needs the iteration number."""

    def __init__(self, kind: str, total_iters: int, step_iters: int, gamma: float, warmup: int = 0):
        self.kind, self.total, self.step, self.gamma, self.warmup = kind, max(1, total_iters), max(1, step_iters), \
            gamma, warmup

    def factor(self, it: int) -> float:
        w = min(1.0, (it + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(it, self.total) / self.total))
        elif self.kind == "step":
            f = self.gamma ** (it // self.step)
        else:
            f = 1.0
        return w * f

    def apply(self, opt: torch.optim.Optimizer, it: int, base_lr: float) -> float:
        f = self.factor(it)
        for g in opt.param_groups:
            g["lr"] = base_lr * g.get("lr_mult", 1.0) * f
        return base_lr * f
