"""Pruning presets: plans saved as JSON files in the project's ``presets/`` folder.

In a checkout that is the top-level ``presets/`` beside ``workbench/``; an installed copy carries
the same files as the package ``workbench._presets`` (see pyproject.toml's package-dir).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_PRESETS = PACKAGE_DIR.parent / "presets"  # a checkout: presets/ beside workbench/
INSTALLED_PRESETS = PACKAGE_DIR / "_presets"  # an installed copy: package data


def presets_dir() -> Path:
    """``$WORKBENCH_PRESETS_DIR``, else the installed copy's presets, else the checkout's ``presets/``."""
    env = os.environ.get("WORKBENCH_PRESETS_DIR")
    if env:
        return Path(env)
    return INSTALLED_PRESETS if INSTALLED_PRESETS.is_dir() else CHECKOUT_PRESETS


def list_presets() -> list[str]:
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def check_name(name: str, what: str = "preset") -> str:
    """A safe file/folder name (no paths), or a precise error."""
    if not _NAME.match(name or ""):
        raise WorkbenchError(
            f"{what} name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def load_preset(name_or_path: str) -> PruningPlan:
    """A preset by name (``ssd-1b``) or a path to a plan file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or os.sep in name_or_path or path.exists():
        return PruningPlan.load(path)
    candidate = presets_dir() / f"{name_or_path}.json"
    if not candidate.exists():
        names = ", ".join(list_presets()) or "none"
        raise WorkbenchError(
            f"unknown preset {name_or_path!r}; available presets: {names} (or give a path to a plan file)"
        )
    return PruningPlan.load(candidate)


def save_preset(plan: PruningPlan, name: str, overwrite: bool = False) -> Path:
    """Save ``plan`` as ``presets/<name>.json``; refuses to overwrite unless asked."""
    path = presets_dir() / f"{check_name(name)}.json"
    if path.exists() and not overwrite:
        raise WorkbenchError(f"preset {name!r} already exists; choose another name or overwrite it")
    return plan.with_removed(plan.removed, name=name).save(path)
