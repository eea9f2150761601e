"""What a student is: its UNet, its spec (plan and layer map), its teacher and the run that
trained it; and how a consistency-distilled one samples. Export and the model card both read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.models import Base
from workbench.runs import RunDir
from workbench.schedulers import is_w_conditioned
from workbench.surgery import StudentSpec


@dataclass(frozen=True)
class Student:
    """A student ready to export: its UNet (or None until loaded), spec, teacher and run."""

    spec: StudentSpec
    base: Base
    unet: Any = field(default=None, repr=False)
    folder: Path | None = None  # where a trained or exported student was read from
    run: RunDir | None = None  # the distillation run that trained it

    @property
    def trained(self) -> bool:
        return self.run is not None


def consistency_kind(student: Student) -> str | None:
    """How a consistency-distilled student samples: ``"w"`` (LCD with LCM's guidance embedding:
    LCM steps, guidance as an input), ``"lora"`` (an LCM-LoRA run's student, adapters merged: LCM
    steps without guidance, which is in its weights), None (the teacher's way)."""
    if is_w_conditioned(student.unet):
        return "w"
    config = (student.run.read_job().get("config") or {}) if student.run else {}
    return "lora" if "lcd" in (config.get("objectives") or ()) and config.get("lcd_lora_rank") else None
