"""Images kept on disk: the teacher's, cached across evaluations, and every evaluation's own.

The teacher's images depend only on the base (its name, where it lives and its UNet
weights), the samples (prompts and seeds), steps, guidance and scheduler, and the library
versions that draw them; an evaluation keyed by all of these reuses them instead of
sampling the teacher again. They are PNGs (lossless), so a cached image scores exactly as
the freshly drawn one did.

```
CACHE/teacher-images/<key hash>/
  key.json          what the images were drawn with (compared whole on every read)
  0000.png ...      one image per sample, in sample order
```
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from PIL import Image

from workbench import cache
from workbench.files import atomic_dir, atomic_write

KIND = "teacher-images"


def teacher_key(base_name: str, location: str, weights: Any, prompts: Sequence[str],
                seeds: Sequence[int], steps: int, guidance: float, scheduler: str = "default") -> dict[str, Any]:  # fmt: skip
    """Everything the teacher's images depend on, JSON-ready."""
    return {
        "base": base_name,
        "location": location,
        "weights": weights,
        "samples": hashlib.sha256(json.dumps([list(prompts), list(seeds)]).encode()).hexdigest(),
        "count": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "versions": {"diffusers": version("diffusers"), "torch": version("torch")},
    }


def stamp(folder: str | Path | None) -> list[list[Any]] | None:
    """Names, sizes and modification times of a UNet folder's weight files: a cheap identity
    for the cache key (hashing an SDXL UNet's 5 GB on every evaluation would cost more than
    it saves); ``None`` for a hub model (its id is the identity)."""
    if folder is None or not Path(folder).is_dir():
        return None
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _folder(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache.folder(KIND) / digest


def cached(key: dict[str, Any]) -> list[Image.Image] | None:
    """The cached images for ``key``, or ``None`` when missing, partial or drawn otherwise."""
    folder = _folder(key)
    try:
        if json.loads((folder / "key.json").read_text(encoding="utf-8")) != key:
            return None
        return load(folder, key["count"])
    except (OSError, ValueError):
        return None


def remember(key: dict[str, Any], images: Sequence[Image.Image]) -> None:
    """Keep ``images`` under ``key`` (a cache that cannot be written costs only the time)."""

    def write(tmp: Path) -> None:
        save(tmp, images)
        (tmp / "key.json").write_text(json.dumps(key, sort_keys=True), encoding="utf-8")

    try:
        atomic_dir(_folder(key), write)
    except OSError:
        pass


def name(index: int) -> str:
    return f"{index:04d}.png"


def save(folder: str | Path, images: Sequence[Image.Image]) -> Path:
    """Write ``images`` as ``0000.png, 0001.png, ...`` (sample order) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        atomic_write(folder / name(i), lambda tmp, img=img: img.save(tmp, format="PNG"))
    return folder


def load(folder: str | Path, count: int) -> list[Image.Image]:
    """``count`` images written by :func:`save` (raises ``OSError`` if one is missing)."""
    out = []
    for i in range(count):
        with Image.open(Path(folder) / name(i)) as img:
            out.append(img.convert("RGB"))
    return out
