"""What a stage trains and how: the student parameters the optimizer updates, the optimizer,
and the learning-rate schedule. One function each, so a new kind (8-bit AdamW, LoRA
adapters) is a local change."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from workbench.sensitivity_kd import freeze


def trainable_parameters(student: torch.nn.Module, frozen_modules: list[str],
                         log: Callable[[str], None] | None = None) -> list[torch.nn.Parameter]:  # fmt: skip
    """Every student parameter except those of ``frozen_modules`` (which get no gradient, so
    they stay out of the optimizer and of DDP's buckets); ``log`` hears what was frozen."""
    student.requires_grad_(True)
    if frozen_modules:
        frozen = freeze(student, frozen_modules)
        total = sum(p.numel() for p in student.parameters())
        if log:
            log(f"{len(frozen_modules)} modules frozen ({frozen:,} of {total:,} parameters)")
    return [p for p in student.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], config) -> torch.optim.Optimizer:
    """AdamW with the run's (a ``DistillConfig``) learning rate and weight decay."""
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config) -> Callable[[int], float]:
    """The learning rate's factor at a stage step: linear warm-up, then constant or cosine
    down to 0.1 over the stage's ``steps`` (the horizon)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        if config.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, config.steps))
            return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return factor


def make_schedule(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
