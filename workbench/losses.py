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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
