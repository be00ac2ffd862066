"""Learning-rate schedules (``model.scheduler``). Add yours here, or name any torch scheduler in the config.

The engine calls the configured partial as ``scheduler(optimizer, total_steps=N)`` (the run's optimizer steps, which
only the Trainer knows), or as ``scheduler(optimizer)`` with ``model.scheduler_takes_total_steps=false`` (torch's
StepLR, ReduceLROnPlateau, ...), and steps it every ``model.scheduler_interval``."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup then cosine decay to ``min_lr_ratio`` x each group's lr, over the whole run.

    One multiplier for every param group keeps the head/backbone ratio fixed, and the horizon spans the frozen and the
    unfrozen phase alike (see ``finetune.py``).
    """
    warmup = max(1, round(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
