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

A training step asks two things of this module: what the teacher gives a batch
(``teacher_targets``) and the stage's objective (``OBJECTIVES[kind]``), a function of the
batch, the student and those targets that returns the named terms (``loss/total`` is the one
to minimise). A stage kind is one entry of ``OBJECTIVES``: ``"kd"`` today.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from workbench.hooks import FeatureCapture


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


OBJECTIVES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"kd": kd_objective}
