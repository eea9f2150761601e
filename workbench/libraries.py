"""diffusers and transformers imported under one lock.

Both libraries import lazily, on first attribute access; two threads doing that at once can see a
half-initialised module ("cannot import name 'CLIPImageProcessor' from 'transformers'", seen when
Compare's Generate ran while the app loaded its start model). Every first touch of them in the
workbench's threads goes through here: ``load`` for a few names (the meta-device UNet of the
catalog), ``import_pipelines`` for everything loading and sampling use (models' loaders, the app's
warm-up).
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

# What loading and sampling pipelines import from the two libraries.
PIPELINE_NAMES = {
    "diffusers": (
        "DiffusionPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel",
        "AutoencoderKL", "EulerDiscreteScheduler", "LCMScheduler",
    ),
    "transformers": (
        "CLIPImageProcessor", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer",
        "CLIPVisionModelWithProjection",
    ),
}  # fmt: skip
_LOCK = threading.RLock()
_pipelines = threading.Event()


def load(library: str, *names: str) -> tuple[Any, ...]:
    """``names`` from ``library`` (imported under the lock)."""
    with _LOCK:
        module = importlib.import_module(library)
        return tuple(getattr(module, name) for name in names)


def import_pipelines() -> None:
    """Import everything in ``PIPELINE_NAMES``, once per process."""
    if _pipelines.is_set():
        return
    with _LOCK:
        if not _pipelines.is_set():
            for library, names in PIPELINE_NAMES.items():
                load(library, *names)
            _pipelines.set()
