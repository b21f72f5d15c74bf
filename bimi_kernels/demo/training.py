"""Pieces shared by pre-training and fine-tuning: the authors' learning-rate schedule and
checkpoints that survive a kill mid-write."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.125,
                  start_factor: float = 1 / 300) -> torch.optim.lr_scheduler.LambdaLR:
    """The authors' schedule per step: the lr rises linearly from `start_factor` x peak to the
    peak over the first `warmup_fraction` of the steps, then follows a cosine down to 0 at
    `total_steps`. (Their GradualWarmupScheduler + CosineAnnealingLR, stepped per epoch: base lr
    x multiplier 300 or 400 as the peak, 10 warm-up epochs of 75-80.) The optimizer's lr is
    the peak."""
    warmup = max(1, int(round(warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return start_factor + (1 - start_factor) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def atomic_save(state, path: Path) -> None:
    """torch.save to a temporary file next to `path`, then os.replace: a kill mid-write leaves
    the previous checkpoint whole (a rename within one folder is atomic)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
