"""Student-vs-teacher image similarity: PSNR and SSIM, for any base model.

Both compare images generated from the same prompt and the same starting noise, so
they measure how far the student's sampling trajectory drifts from the teacher's.
Images are compared in [0, 1] RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The standard SSIM constants (Wang et al. 2004) for a dynamic range of 1.
_C1 = 0.01**2
_C2 = 0.03**2
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> float64 tensor (N, 3, H, W) in [0, 1]."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB; identical images get ``max_db`` rather than infinity."""
    _check_pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    db = 10 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return db.clamp(max=max_db)


def _gaussian_window(size: int, sigma: float, channels: int, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM with an 11x11 Gaussian window (sigma 1.5), per channel.

    Windows are only taken where they fit inside the image ('valid'), like the
    reference implementation, so borders are not padded with invented pixels.
    """
    _check_pair(a, b)
    channels = a.shape[1]
    size = min(_SSIM_WINDOW, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size, _SSIM_SIGMA, channels, a.dtype)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    return (num / den).flatten(1).mean(dim=1)


def compare(student: Sequence[Image.Image], teacher: Sequence[Image.Image]) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of student images against same-seed teacher images."""
    if len(student) != len(teacher) or not student:
        raise ValueError("need the same, non-zero number of student and teacher images")
    a, b = to_tensor(student), to_tensor(teacher)
    return {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean())}
