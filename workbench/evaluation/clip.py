"""CLIP score and PickScore: how well an image matches its prompt, by a CLIP model the user names.

CLIP score is torchmetrics' (``CLIPScore``: ``100 * cos(image, text)`` embeddings); it is
computed per sample here by torchmetrics' own update function, so each sample's score enters
the evaluation's bootstrap like any other. torchmetrics' class then reports
``max(mean, 0)``; the per-sample mean is the same number whenever it is positive.

PickScore (Kirstain et al. 2023) is a CLIP model fine-tuned on human preferences and scored
as ``exp(logit_scale) * cos(image, text)``, the same cosine scaled by the model's own
temperature: it goes through the same path, with its model (``yuvalkirstain/PickScore_v1``)
and the processor it was trained with (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).

The model is a local folder or a hub id (``from_pretrained``); with ``HF_HUB_OFFLINE=1`` only
folders and models already in the hub cache load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from workbench.errors import WorkbenchError

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
BATCH = 16


@dataclass(frozen=True)
class Clip:
    """A loaded CLIP model (wrapped in :class:`Projected`), its processor and its name."""

    model: Any
    processor: Any
    name: str

    @property
    def temperature(self) -> float:
        return float(self.model.model.logit_scale.detach().exp())


class Projected(torch.nn.Module):
    """A CLIP model whose ``get_image_features``/``get_text_features`` return the projected
    embeddings as tensors, as torchmetrics 1.9 expects; transformers 5 returns them as the
    ``pooler_output`` of an output object, on which torchmetrics' ``.norm`` fails."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@lru_cache(maxsize=4)
def load(model: str, processor: str | None = None) -> Clip:
    """A CLIP model and processor from a folder or the hub (``processor`` defaults to ``model``)."""
    from transformers import CLIPModel, CLIPProcessor  # heavy: only when a CLIP metric is asked for

    try:
        clip = CLIPModel.from_pretrained(model).eval()
        proc = CLIPProcessor.from_pretrained(processor or model)
    except (OSError, ValueError) as err:
        raise WorkbenchError(
            f"cannot load the CLIP model {model!r}" + (f" with processor {processor!r}" if processor else "")
            + f": {err}. Give a local folder saved by CLIPModel.save_pretrained (with its processor "
            "files) or a hub id such as openai/clip-vit-large-patch14"
        ) from None  # fmt: skip
    return Clip(Projected(clip), proc, model)


def as_tensors(images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """PIL images -> uint8 (3, H, W) tensors, the form torchmetrics' CLIP score takes."""
    return [torch.from_numpy(np.array(i.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1) for i in images]


@torch.no_grad()
def cosines(clip: Clip, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
    """``100 * cos(image, prompt)`` per sample, by torchmetrics, ``BATCH`` at a time."""
    if len(images) != len(prompts) or not images:
        raise WorkbenchError("CLIP score needs one prompt per image, and at least one image")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update  # heavy

    tensors, out = as_tensors(images), []
    for i in range(0, len(tensors), BATCH):
        score, _ = _clip_score_update(tensors[i : i + BATCH], list(prompts[i : i + BATCH]),
                                      clip.model, clip.processor)  # fmt: skip
        out.append(score.detach().cpu().double().numpy())
    return np.concatenate(out)


def clip_score(clip: Clip, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
    """Per-sample CLIP score (``100 * cos``)."""
    return cosines(clip, images, prompts)


def pickscore(clip: Clip, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
    """Per-sample PickScore: ``exp(logit_scale) * cos``."""
    return cosines(clip, images, prompts) * (clip.temperature / 100.0)
