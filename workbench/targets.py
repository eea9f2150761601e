"""Teacher targets computed once and read from disk, so the teacher is not on the device
while the student trains (``--teacher-targets precompute``).

Before a stage's first student step, the teacher runs over every micro-batch the stage will
take: ``batches(g, micro)`` is a pure function of (seed, step, micro-batch, rank), so these
are exactly the batches, noise and timesteps of the student steps. Its prediction and the
outputs of the feature pairs' teacher modules are written, one safetensors file per
micro-batch, into ``RUN/targets/stage_K/rank_R/``; then the teacher leaves the device and
every student step reads its targets back. A resumed run computes only the files that are
missing (each is written atomically), so it takes the same steps an uninterrupted one
would. A stage's files are deleted once its student is saved.

Disk: a step's targets hold the teacher's prediction and every paired feature map, in the
teacher's dtype (``python -m workbench memory`` prints the bytes per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench import losses
from workbench.errors import WorkbenchError
from workbench.files import atomic_write, remove_tree
from workbench.progress import Progress, report

MODES = ("live", "precompute")
PRED = "pred"
FEATURE = "feature/"  # + the teacher module's dotted path


@dataclass(frozen=True)
class TargetStore:
    """One process's precomputed targets of one stage: ``read(g, micro)`` gives micro-batch
    ``micro`` of global step ``g``, on ``device``."""

    folder: Path
    device: Any = "cpu"

    def path(self, g: int, micro: int) -> Path:
        return Path(self.folder) / f"step_{g:07d}_{micro}.safetensors"

    def write(self, g: int, micro: int, targets: losses.TeacherTargets) -> int:
        """Save one micro-batch's targets (atomically); returns the bytes written."""
        from safetensors.torch import save_file

        tensors = {FEATURE + name: t for name, t in targets.features.items()}
        if targets.pred is not None:
            tensors[PRED] = targets.pred
        # own contiguous CPU copies: captured features can be views sharing one storage
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        atomic_write(self.path(g, micro), lambda tmp: save_file(tensors, str(tmp)))
        return sum(v.numel() * v.element_size() for v in tensors.values())

    def read(self, g: int, micro: int) -> losses.TeacherTargets:
        from safetensors.torch import load_file

        path = self.path(g, micro)
        if not path.exists():
            raise WorkbenchError(
                f"the precomputed teacher targets of step {g + 1} (micro-batch {micro + 1}) are missing "
                f"from {self.folder}; resume the run to compute them again"
            )
        tensors = load_file(str(path), device=str(self.device))
        features = {k[len(FEATURE) :]: v for k, v in tensors.items() if k.startswith(FEATURE)}
        return losses.TeacherTargets(tensors.get(PRED), features)

    def remove(self) -> None:
        remove_tree(self.folder)


def precompute(store: TargetStore, teacher: torch.nn.Module, batches: Callable[[int, int], dict[str, Any]],
               setup: losses.KDSetup, steps: range, accum: int,
               progress: Progress | None = None) -> tuple[int, int]:  # fmt: skip
    """The teacher's targets of micro-batches ``batches(g, micro)`` for ``g`` in ``steps``,
    written into ``store`` where missing. Returns (files written, bytes written)."""
    todo = [(g, m) for g in steps for m in range(accum) if not store.path(g, m).exists()]
    written = 0
    for i, (g, micro) in enumerate(todo):
        written += store.write(g, micro, losses.teacher_targets(teacher, batches(g, micro), setup))
        if progress and (i + 1) % max(1, len(todo) // 10) == 0:
            report(progress, (i + 1) / len(todo), "precomputing teacher targets")
    return len(todo), written


def for_step(teacher: Any, batch: dict[str, Any], setup: Any, g: int, micro: int,
             live: Callable[..., Any] = losses.teacher_targets) -> Any:  # fmt: skip
    """A training step's teacher targets: read from the store (precomputed, block KD), or
    ``live(teacher, batch, setup)``, the stage objective's own targets."""
    if isinstance(teacher, TargetStore):
        return teacher.read(g, micro)
    return live(teacher, batch, setup)
