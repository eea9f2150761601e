"""What may change when a run resumes: the stored config with the options given again applied
where a resumed run can take them (only ``steps`` may grow), and the log line that says so."""

from __future__ import annotations

import dataclasses
from typing import Any

from workbench.distill_config import DistillConfig, check_whole
from workbench.errors import ConfigError, flag


def _shown(field: str, value: Any) -> str:
    if field == "stages":
        return ", ".join(str(p.get("name")) if isinstance(p, dict) else str(p) for p in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def resume_config(
    stored: DistillConfig, changes: dict[str, Any]
) -> tuple[DistillConfig, list[dict[str, Any]]]:
    """The run's stored config with ``changes`` (field -> value: the options given with resume)
    applied where a resumed run can take them, and a record of what changed.

    Only ``steps`` can change: it can grow, on a one-stage run (global step numbers and the
    cosine schedule's horizon follow it; later stages would renumber the steps already
    taken). Any other change is refused by name; values equal to the stored ones are no change.
    """
    applied = []
    for name, value in changes.items():
        if name not in stored.__dataclass_fields__:
            raise ConfigError(name, "{field} is not an option of a distillation run")
        was = getattr(stored, name)
        if value == was:
            continue
        shown = {"was": _shown(name, was), "given": _shown(name, value)}
        if name != "steps":
            raise ConfigError(
                name, "{field} cannot change on resume (was {was}, given {given}); start a new run", **shown
            )
        check_whole("steps", value)
        if value < was:
            raise ConfigError("steps", "{field} can only grow on resume (was {was}, given {given})", **shown)
        if len(stored.stages) > 1:
            raise ConfigError(
                "steps", "{field} can change on resume only for a one-stage run (this one has {n}; was {was}, "
                "given {given}); start a new run", n=len(stored.stages), **shown,
            )  # fmt: skip
        applied.append({"field": name, "was": was, "now": value})
    return dataclasses.replace(stored, **{c["field"]: c["now"] for c in applied}), applied


def describe_changes(config: DistillConfig, changed: list[dict[str, Any]]) -> str:
    """One log line for what a resume changed."""
    parts = [f"{flag(c['field'])} {c['now']} (was {c['was']})" for c in changed]
    note = "; the cosine schedule's horizon moves with it" if config.lr_schedule == "cosine" else ""
    return f"resumed with {', '.join(parts)}{note}"
