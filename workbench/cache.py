"""The workbench's disk cache: one root, one layout, one way to read and write an entry.

```
ROOT/            $WORKBENCH_CACHE_DIR, or ~/.cache/sdxl-workbench
  latency/       teacher latency profiles (workbench.latency): model, device, dtype, px, batch
  sensitivity/   sensitivity maps (workbench.sensitivity): weights, calibration, device
  figures/       catalog figures of a UNet config: parameters per atom (workbench.catalog),
                 FLOPs per atom and latent size (workbench.cost); counting them imports
                 diffusers and builds the model on the meta device, seconds an app start saves
  teacher-images/  a teacher's evaluation images (workbench.evaluation.images): one folder
                 of PNGs per base, samples, steps, guidance and scheduler
```

A new kind of entry is a new folder: add its name to ``KINDS``.

Each entry is one JSON file with a ``schema`` number, written atomically. An entry that is
missing, unreadable or of another schema reads as ``None``: the caller measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from workbench.files import write_json_atomic

T = TypeVar("T")
ENV = "WORKBENCH_CACHE_DIR"
KINDS = ("latency", "sensitivity", "figures", "teacher-images")


def root() -> Path:
    """``$WORKBENCH_CACHE_DIR`` or ``~/.cache/sdxl-workbench``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdxl-workbench"


def folder(kind: str) -> Path:
    """Where entries of ``kind`` (one of ``KINDS``) live; nothing is created."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    return root() / kind


def path(kind: str, name: str) -> Path:
    return folder(kind) / name


def read(entry: Path, schema: int) -> dict[str, Any] | None:
    """The entry's JSON if it is there, readable and of ``schema``; else ``None``."""
    try:
        data = json.loads(Path(entry).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == schema else None


def write(entry: Path, data: dict[str, Any]) -> Path:
    """Write an entry atomically (a reader never sees half of it)."""
    return write_json_atomic(entry, data, indent=1)


def remembered(kind: str, key: str, schema: int, compute: Callable[[], T]) -> T:
    """``compute()``'s JSON-able value, kept in entry ``key`` of ``kind``: read back when there,
    else computed and written (a cache that cannot be written costs only the time)."""
    stamp = f"{key}|{_versions()}"
    entry = path(kind, hashlib.sha256(stamp.encode()).hexdigest()[:24] + ".json")
    data = read(entry, schema)
    if data is not None and data.get("key") == stamp:
        return data["value"]
    value = compute()
    try:
        write(entry, {"schema": schema, "key": stamp, "value": value})
    except OSError:
        pass
    return value


def _versions() -> str:
    """The library versions a figure depends on (how diffusers builds a config's modules)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"diffusers {version('diffusers')}, torch {version('torch')}"
    except PackageNotFoundError:
        return "unknown"
