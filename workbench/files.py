"""Atomic writes, the one way the workbench writes files others read.

Each writer writes a temporary sibling, then renames it over the target: a reader never
sees half a file, and a crash never corrupts what was already there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write a temporary sibling of ``path``, then move it into place.

    The temporary name ends in ``.tmp`` (writers that infer a format from the suffix must be
    told the format, e.g. ``image.save(tmp, format="PNG")``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """JSON, flushed to disk before the rename (status files must survive a power cut)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def remove_tree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def atomic_dir(final: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a fresh ``<final>.tmp`` folder, then put it in ``final``'s place."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    remove_tree(tmp)
    write(tmp)
    remove_tree(final)
    tmp.rename(final)
    return final
