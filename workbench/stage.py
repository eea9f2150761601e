"""A stage of a distillation run: its models, their assembly, and the optimizer step.

The recipe (``workbench.distill``) and the memory estimate (``workbench.memory``) both build
a stage with these functions and take this very step, so the estimate measures what a run
does (the estimate on fake tensors, from models built on the meta device).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workbench import lora_kd, losses, optim, surgery, targets
from workbench.distill_config import DistillConfig
from workbench.dtypes import torch_dtypes
from workbench.models import as_teacher
from workbench.parallel import mean_across
from workbench.schedulers import LCM_ORIGINAL_STEPS

TEACHER_DTYPES = torch_dtypes()  # the one table: workbench.dtypes


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


@dataclass(frozen=True)
class StageModels:
    """A stage's models as its training starts, before adapters and the optimizer."""

    kind: str  # what it optimises: losses.OBJECTIVES[kind]
    student: Any  # fp32 on the device; an lcd stage's has LCM's w-embedding (unless LCM-LoRA)
    teacher: Any  # eval, no gradients, in --teacher-dtype on the device
    pairs: list[tuple[str, str]]  # (student module, teacher module) the objective compares


def stage_models(
    cfg: DistillConfig, specs: list, k: int, original, previous, device, start: dict[str, Any] | None = None
) -> StageModels:
    """Stage ``k``'s student and teacher: the student built from ``original`` (the teacher's
    UNet) or ``previous`` (the stage before's student, for ``k`` > 0), starting from the
    state dict ``start`` where given; the teacher ``cfg.stage_teacher`` names. Models on the
    meta device give models on the meta device (the memory estimate's)."""
    student, teacher, pairs = surgery.stage_models(
        original, specs, k, previous, cfg.stage_teacher, cfg.feature_mode
    )
    if start is not None:
        student.load_state_dict(start)
    teacher = as_teacher(teacher, device, TEACHER_DTYPES[cfg.teacher_dtype])
    kind = cfg.stage_kind(k)
    if kind == "lcd":  # LCM's w-conditioning (the guidance scale as an embedding), or LCM-LoRA
        pairs = []
        student = student if cfg.lcd_lora_rank else surgery.with_guidance_embedding(student)
    return StageModels(kind, student.float().to(device), teacher, pairs if cfg.w_feat > 0 else [])


def add_adapters(
    cfg: DistillConfig, specs: list, k: int, models: StageModels, log: Callable[[str], None]
) -> None:
    """LoRA-enhanced distillation's adapters (where a layer's input held), or LCM-LoRA's on
    an lcd stage; none where the full weights train."""
    if cfg.lora_rank:
        info = lora_kd.add_adapters(models.student, lora_kd.init_spec(specs, k), cfg.lora_rank)
        log(f"LoRA adapters on {info['adapted_modules']} modules")
    elif models.kind == "lcd" and cfg.lcd_lora_rank:
        info = lora_kd.add_consistency_adapters(models.student, cfg.lcd_lora_rank)
        log(f"LCM-LoRA on {info['adapted_modules']} modules")


def trainable(
    cfg: DistillConfig,
    student,
    frozen: list[str],
    log: Callable[[str], None] | None = None,
    checkpoint: Callable[..., Any] | None = None,
) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps (all but ``frozen`` modules', or what adapters left
    trainable); gradient checkpointing on where asked (``checkpoint``: the function that
    recomputes a layer, torch's by default)."""
    params = optim.trainable_parameters(student, frozen, log=log)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing(checkpoint)
    return params


def kd_setup(cfg: DistillConfig, pairs: list[tuple[str, str]], feature_weights=None) -> losses.KDSetup:
    return losses.KDSetup(cfg.weights, pairs, cfg.normalize_features, feature_weights)


def ema_target(student):
    """An lcd stage's EMA target network: a copy of the student as it starts (adapters too),
    never trained directly."""
    return copy.deepcopy(student).eval().requires_grad_(False)


def lcd_setup(
    cfg: DistillConfig, target, alphas_cumprod: torch.Tensor, prediction_type: str, reward=None
) -> losses.LCDSetup:
    """Consistency distillation on the teacher's noise schedule (``alphas_cumprod`` (T,) on
    the device), with the EMA ``target`` network and, for RG-LCD, a frozen reward."""
    return losses.LCDSetup(
        alphas_cumprod,
        prediction_type,
        cfg.lcd_guidance,
        target,
        cfg.lcd_ema,
        cfg.lcd_loss,
        cfg.lcd_huber_c,
        LCM_ORIGINAL_STEPS,
        reward,
        cfg.lcd_reward_weight,
    )


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
