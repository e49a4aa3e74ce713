"""Learning-rate schedules usable from YAML (`lr_scheduler: class_path: ...`)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from spectralds.errors import UserError


class WarmupCosineLR(LambdaLR):
    """Linear warm-up to the optimizer's lr, then cosine decay to `min_lr_ratio` * lr.

    The published Flash STU schedule sets warm-up steps = total steps, so it never decays;
    here the two are separate and `total_steps` must exceed `warmup_steps`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 100,
        total_steps: int = 1000,
        min_lr_ratio: float = 0.1,
    ) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise UserError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
