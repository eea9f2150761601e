"""LPIPS of a student's image to the teacher's on the same sample, beside PSNR and SSIM.

torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (AlexNet backbone, the LPIPS
paper's default; lower is closer). It needs torchvision, whose AlexNet ImageNet weights it
downloads once into the torch hub cache (``~/.cache/torch/hub/checkpoints``); the LPIPS
linear layers ship inside torchmetrics. Install with ``pip install torchvision`` matching
your torch (``torchvision==0.28.*`` for torch 2.13). Without torchvision, ``lpips`` is
refused with that sentence.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.quality import to_tensor

NET = "alex"
BATCH = 16
PROTOCOL = f"LPIPS {NET} (torchmetrics), images in [0, 1] at their own size"


def available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def check() -> None:
    if not available():
        raise WorkbenchError(
            "lpips needs torchvision (its AlexNet backbone): `pip install torchvision` matching your torch; "
            "its weights then download once into the torch hub cache"
        )


@torch.no_grad()
def lpips(student: Sequence[Image.Image], teacher: Sequence[Image.Image]) -> np.ndarray:
    """Per-sample LPIPS of student images to same-sample teacher images."""
    check()
    if len(student) != len(teacher) or not student:
        raise WorkbenchError("need the same, non-zero number of student and teacher images")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity  # heavy, needs torchvision

    metric = LearnedPerceptualImagePatchSimilarity(net_type=NET, reduction="none", normalize=True)
    out = []
    for i in range(0, len(student), BATCH):
        a = to_tensor(student[i : i + BATCH]).float()
        b = to_tensor(teacher[i : i + BATCH]).float()
        out.append(metric(a, b).reshape(-1).double().numpy())
    return np.concatenate(out)
