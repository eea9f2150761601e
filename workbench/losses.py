"""Distillation losses: pure functions returning a dict of named terms.

total = w_task * task + w_out * out + w_feat * sum(feat terms)

- task: MSE between the student's prediction and the scheduler's target (noise or v);
- out: MSE between the student's and the frozen teacher's predictions (output KD);
- feat: one MSE per feature pair (layer-level KD: every kept ResNet and attention output).

With ``normalize=True`` each feature term is divided by the teacher feature's mean square,
so deep high-magnitude features don't swamp the others (and the task loss).

``feature_weights`` (one per pair, e.g. from the teacher's sensitivity map) make the feature
loss a weighted sum; the per-pair terms are logged unweighted. Without them the sum is the
plain one, computed exactly as before.

A training step asks three things of this module, the stage kind's ``Objective``
(``OBJECTIVES[kind]``): what the teacher gives a batch (``targets``), the loss, a function of
the batch, the student and those targets that returns the named terms (``loss/total`` is the
one to minimise), and what follows each optimizer step (``after_step``; the EMA target of
consistency distillation). Stage kinds: ``"kd"`` (block-removal KD, above) and ``"lcd"``
(latent consistency distillation, below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from workbench.hooks import FeatureCapture
from workbench.schedulers import guidance_embedding


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0
    out: float = 0.5
    feat: float = 0.5


def feature_term(student: torch.Tensor, teacher: torch.Tensor, normalize: bool) -> torch.Tensor:
    loss = F.mse_loss(student.float(), teacher.float())
    if normalize:
        loss = loss / teacher.float().pow(2).mean().clamp_min(1e-6)
    return loss


def distillation_loss(
    student_pred: torch.Tensor,
    teacher_pred: torch.Tensor | None,
    target: torch.Tensor,
    student_feats: dict[str, torch.Tensor],
    teacher_feats: dict[str, torch.Tensor],
    pairs: list[tuple[str, str]],
    weights: LossWeights,
    normalize: bool = False,
    feature_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every term under its metric key (``loss/task``, ``loss/feat/<student module>``, ...)."""
    terms: dict[str, torch.Tensor] = {"loss/task": F.mse_loss(student_pred.float(), target.float())}
    total = weights.task * terms["loss/task"]
    if teacher_pred is not None:
        terms["loss/out"] = F.mse_loss(student_pred.float(), teacher_pred.float())
        total = total + weights.out * terms["loss/out"]
    if pairs:
        feats = [feature_term(student_feats[s], teacher_feats[t], normalize) for s, t in pairs]
        for (s, _), term in zip(pairs, feats):
            terms[f"loss/feat/{s}"] = term
        stacked = torch.stack(feats)
        if feature_weights is not None:
            if feature_weights.shape != stacked.shape:
                raise ValueError(f"{len(pairs)} feature pairs but {feature_weights.numel()} feature weights")
            stacked = stacked * feature_weights.to(device=stacked.device, dtype=stacked.dtype)
        terms["loss/feat"] = stacked.sum()
        total = total + weights.feat * terms["loss/feat"]
    terms["loss/total"] = total
    return terms


# --------------------------------------------------------------------------- a training step's objective


@dataclass(frozen=True)
class KDSetup:
    """What the ``kd`` objective needs besides the batch: feature pairs (student module, teacher
    module), the loss weights, and optional per-pair weights (in the pairs' order)."""

    weights: LossWeights
    pairs: list[tuple[str, str]] = field(default_factory=list)
    normalize: bool = False
    feature_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class TeacherTargets:
    """What the teacher gives a batch: its prediction (None: not asked for) and the outputs of
    the pairs' teacher modules."""

    pred: torch.Tensor | None
    features: dict[str, torch.Tensor]


def cast(tree: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors of a nested dict in ``dtype`` (integer timesteps stay)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: cast(v, dtype) for k, v in tree.items()}
    return tree


def teacher_targets(teacher: torch.nn.Module, batch: dict[str, Any], setup: KDSetup) -> TeacherTargets:
    """The teacher's outputs and features for a batch: a live forward without gradients (none
    at all when nothing needs the teacher: task-only runs)."""
    with_output = setup.weights.out > 0
    if not (with_output or setup.pairs):
        return TeacherTargets(None, {})
    with torch.no_grad(), FeatureCapture(teacher, [t for _, t in setup.pairs]) as feats:
        pred = teacher(**cast(batch["inputs"], teacher.dtype)).sample.float()
    return TeacherTargets(pred if with_output else None, feats)


def kd_objective(batch: dict[str, Any], student: Callable, hooked: torch.nn.Module,
                 targets: TeacherTargets, setup: KDSetup) -> dict[str, torch.Tensor]:  # fmt: skip
    """Block-removal KD: the student's prediction against the task target and the teacher's,
    its features against the teacher's. ``student`` is called (it may be a DDP wrapper);
    ``hooked`` is the module the feature hooks go on (the unwrapped student)."""
    with FeatureCapture(hooked, [s for s, _ in setup.pairs]) as feats:
        pred = student(**batch["inputs"]).sample.float()
    return distillation_loss(
        pred, targets.pred, batch["target"], feats, targets.features, setup.pairs, setup.weights,
        setup.normalize, setup.feature_weights if setup.pairs else None,
    )  # fmt: skip


# --------------------------------------------------------------------------- latent consistency distillation
#
# LCD (Luo et al. 2023, "Latent Consistency Models"): the student f(x_t, t, w, c) learns to map
# any point of the guided teacher's probability-flow ODE to its origin. A step: noise clean
# latents to a timestep t_n of a DDIM grid; one DDIM step of the guided teacher (scale w drawn
# from a range) over the skipping interval gives x_{n-k}; the target is the EMA target network's
# f(x_{n-k}, t_{n-k}, w, c); the student's f(x_n, t_n, w, c) is pulled to it (pseudo-Huber or L2).
# f = c_skip(t) x + c_out(t) x0_pred(t): the boundary scalings LCMScheduler samples with.

LCD_LOSSES = ("huber", "l2")
SIGMA_DATA = 0.5  # LCMScheduler's
TIMESTEP_SCALING = 10.0  # LCMScheduler's default ``timestep_scaling``


@dataclass(frozen=True)
class LCDSetup:
    """What the ``lcd`` objective needs besides the batch."""

    alphas_cumprod: torch.Tensor  # (T,) the teacher's noise schedule, on the training device
    prediction_type: str  # epsilon | v_prediction | sample
    guidance: tuple[float, float]  # the teacher's guidance scales are drawn uniformly from this range
    target: torch.nn.Module  # the EMA target network (a copy of the student, never trained directly)
    ema: float = 0.95  # target <- ema * target + (1 - ema) * student after every optimizer step
    loss: str = "huber"
    huber_c: float = 0.001
    solver_steps: int = 50  # DDIM grid: skipping interval T / solver_steps (schedulers.LCM_ORIGINAL_STEPS)
    # RG-LCD: a frozen differentiable reward (latents, cond) -> (B,) of the one-step prediction
    # (workbench.reward), climbed with this weight; None: plain LCD
    reward: Callable[..., torch.Tensor] | None = None
    reward_weight: float = 0.0


@dataclass(frozen=True)
class ConsistencyTargets:
    """One micro-batch's LCD targets: the student's inputs and what its output must match."""

    x_t: torch.Tensor  # (B, C, h, w) noised latents at t_n
    t: torch.Tensor  # (B,) t_n
    w: torch.Tensor | None  # (B, D) guidance-scale embedding (None: a student without one, LCM-LoRA)
    target: torch.Tensor  # (B, C, h, w) the target network's f at (x_{n-k}, t_{n-k})


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of timesteps ``t`` (B,) as (B, 1, 1, 1): c_skip(0) = 1, c_out(0) = 0."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def x0_and_eps(out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, kind: str):
    """(predicted clean latents, predicted noise) from a UNet output of prediction ``kind``;
    ``alpha`` (B, 1, 1, 1) is the cumulative alpha of the timestep."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if kind == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    if kind == "epsilon":  # zero terminal SNR has a = 0 at the last step: no x0 from epsilon there
        return (x_t - s * out) / a.clamp_min(1e-4), out
    if kind == "sample":
        return out, (x_t - a * out) / s.clamp_min(1e-4)
    raise ValueError(f"prediction type {kind!r}: LCD supports epsilon, v_prediction and sample")


def solver_timesteps(index: torch.Tensor, total: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_n, t_{n-k}) of DDIM grid positions ``index`` (0..steps-1): the grid is LCM's,
    ``(1..steps) * (total // steps) - 1``; the step before the first is clamped to 0."""
    skip = total // steps
    t = (index + 1) * skip - 1
    return t, (t - skip).clamp_min(0)


def _cat(a: Any, b: Any) -> Any:
    """Two nested dicts of tensors concatenated along the batch."""
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def consistency_function(unet: Callable, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None,
                         text: dict[str, Any], setup: LCDSetup) -> torch.Tensor:  # fmt: skip
    """f(x, t, w, c) = c_skip(t) x + c_out(t) x0_pred: the consistency model's output."""
    out = unet(sample=x, timestep=t, timestep_cond=w, **text).sample.float()
    alpha = setup.alphas_cumprod[t][:, None, None, None]
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x + c_out * x0_and_eps(out, x, alpha, setup.prediction_type)[0]


def lcd_targets(teacher: torch.nn.Module, batch: dict[str, Any], setup: LCDSetup) -> ConsistencyTargets:
    """The guided teacher's DDIM step over the skipping interval, then the target network's
    consistency output there. The grid position comes from the batch's timestep (uniform)."""

    c = batch["consistency"]
    total = len(setup.alphas_cumprod)
    index = batch["inputs"]["timestep"] * setup.solver_steps // total
    t, t_prev = solver_timesteps(index, total, setup.solver_steps)
    low, high = setup.guidance
    scale = low + (high - low) * c["u"]  # (B,)
    dim = setup.target.config.get("time_cond_proj_dim")  # None: LCM-LoRA, no guidance embedding
    w = guidance_embedding(scale, dim) if dim else None
    alpha = setup.alphas_cumprod[t][:, None, None, None]
    x_t = alpha.sqrt() * c["latents"] + (1 - alpha).sqrt() * c["noise"]  # (B, C, h, w)
    with torch.no_grad():
        inputs = {
            "sample": torch.cat([x_t, x_t]),
            "timestep": torch.cat([t, t]),
            **_cat(c["cond"], c["uncond"]),
        }
        cond, uncond = teacher(**cast(inputs, teacher.dtype)).sample.float().chunk(2)
        x0_c, eps_c = x0_and_eps(cond, x_t, alpha, setup.prediction_type)
        x0_u, eps_u = x0_and_eps(uncond, x_t, alpha, setup.prediction_type)
        s = scale[:, None, None, None]
        x0, eps = x0_u + s * (x0_c - x0_u), eps_u + s * (eps_c - eps_u)  # classifier-free guidance
        alpha_prev = setup.alphas_cumprod[t_prev][:, None, None, None]
        x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps  # DDIM, t_n -> t_{n-k}
        target = consistency_function(setup.target, x_prev, t_prev, w, c["cond"], setup)
    return ConsistencyTargets(x_t, t, w, target)


def lcd_objective(batch: dict[str, Any], student: Callable, hooked: torch.nn.Module,
                  targets: ConsistencyTargets, setup: LCDSetup) -> dict[str, torch.Tensor]:  # fmt: skip
    """The student's consistency output at (x_n, t_n) against the target's at (x_{n-k}, t_{n-k});
    with a reward (RG-LCD), minus its weighted mean over that output, the student's one-step
    prediction of the clean latents (``loss/reward`` logs the mean reward)."""
    cond = batch["consistency"]["cond"]
    pred = consistency_function(student, targets.x_t, targets.t, targets.w, cond, setup)
    diff = pred - targets.target
    if setup.loss == "huber":
        loss = (torch.sqrt(diff.pow(2) + setup.huber_c**2) - setup.huber_c).mean()
    else:
        loss = diff.pow(2).mean()
    terms = {"loss/lcd": loss, "loss/total": loss}
    if setup.reward is not None:  # (B,) scores of the prediction, differentiable w.r.t. it
        terms["loss/reward"] = setup.reward(pred, cond).float().mean()
        terms["loss/total"] = loss - setup.reward_weight * terms["loss/reward"]
    return terms


@torch.no_grad()
def ema_update(student: torch.nn.Module, setup: LCDSetup) -> None:
    """The target network follows the student: ``target <- ema * target + (1 - ema) * student``."""
    for t, s in zip(setup.target.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - setup.ema)


# --------------------------------------------------------------------------- the stage kinds


@dataclass(frozen=True)
class Objective:
    """A stage kind: the teacher's targets for a batch, the loss, and what follows a step."""

    targets: Callable[..., Any]  # (teacher, batch, setup) -> targets
    loss: Callable[..., dict[str, torch.Tensor]]  # (batch, student, hooked, targets, setup) -> terms
    after_step: Callable[[torch.nn.Module, Any], None] | None = None  # (unwrapped student, setup)


OBJECTIVES: dict[str, Objective] = {
    "kd": Objective(teacher_targets, kd_objective),
    "lcd": Objective(lcd_targets, lcd_objective, ema_update),
}
