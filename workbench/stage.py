"""A stage of a distillation run: its models and the optimizer step it takes.

The recipe (``workbench.distill``) and the memory estimate (``workbench.memory``) both take
this very step, so the estimate measures what a run does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from workbench import losses, targets
from workbench.distill_config import DistillConfig
from workbench.parallel import mean_across

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Stage:
    """One stage's training state."""

    index: int  # 0-based
    kind: str  # what it optimises: losses.OBJECTIVES[kind]
    student: Any  # what a step calls (DDP-wrapped when distributed)
    raw: Any  # the unwrapped student: feature hooks, samples, saving
    teacher: Any  # the teacher UNet, or its precomputed targets (targets.TargetStore)
    setup: Any  # the objective's: losses.KDSetup (feature pairs, weights) or losses.LCDSetup
    optimizer: Any
    schedule: Any
    accelerator: Any  # this stage's own: its checkpoints hold this stage's objects only
    first: int  # the stage step to start at (after a checkpoint)


# The step the loop takes: the teacher's targets, the stage's objective, backward (gradients
# accumulated over micro-batches), update. A function of the stage alone, so that other tools
# (a memory estimate) can take the very same step.
def train_step(stage: Stage, batches, g: int, cfg: DistillConfig) -> dict[str, float]:
    """Optimizer step ``g`` of a stage (``batches(g, micro)`` gives its micro-batches); the
    terms averaged over micro-batches and processes."""
    acc = stage.accelerator
    objective, totals = losses.OBJECTIVES[stage.kind], {}
    for micro in range(cfg.grad_accum):
        batch = batches(g, micro)
        # the teacher's targets: its live forward, or read back where they were precomputed
        teacher = targets.for_step(stage.teacher, batch, stage.setup, g, micro, objective.targets)
        # Only the last micro-batch syncs gradients across processes.
        sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(stage.student)
        with sync, acc.autocast():
            terms = objective.loss(batch, stage.student, stage.raw, teacher, stage.setup)
            acc.backward(terms["loss/total"] / cfg.grad_accum)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float().item() / cfg.grad_accum
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(stage.student.parameters(), cfg.max_grad_norm)
    stage.optimizer.step()
    if objective.after_step is not None:
        objective.after_step(stage.raw, stage.setup)
    stage.schedule.step()
    stage.optimizer.zero_grad(set_to_none=True)
    return mean_across(acc, totals)
