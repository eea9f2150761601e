"""FID and KID: how far one set of images lies from another in a feature space.

The distances themselves are torchmetrics' (``FrechetInceptionDistance``,
``KernelInceptionDistance``); this room chooses the feature extractor, extracts each image
set's features once (a teacher's features serve every student), and writes the protocol
beside every number, because FID moves with it: the extractor and its weights, how images
are resized into it, and how many images each side has (clean-fid vs torch-fidelity
resizing, 10k vs 30k samples give different figures for the same model).

Feature extractors (``--fid-features``):

- ``inception``: InceptionV3 pool3 (2048-d) with the FID weights of torch-fidelity, images
  resized to 299x299 by antialiased bilinear interpolation inside the network: torchmetrics'
  default, the protocol most papers report. Needs ``pip install torch-fidelity`` (it
  downloads its weights once, from GitHub).
- ``clip``: the image embeddings of the CLIP model named by ``--clip-model`` (resize and crop by
  its processor): the FD_CLIP of Kynkaanniemi et al. 2023, less tied to ImageNet classes.
- ``pixels``: the images area-resized to 8x8 RGB (192-d). Needs no weights (it is what the toy
  uses offline) and is comparable only with itself, never with a published FID.

Any ``torch.nn.Module`` mapping uint8 images ``(N, 3, H, W)`` to ``(N, D)`` features works too
(tests pass a tiny one).

Intervals: FID has no per-sample scores, so its interval re-weights the features with the
evaluation's cluster bootstrap over prompts (each resample's weighted means and covariances)
and takes the 2.5th and 97.5th percentiles. Against the teacher's images of the same samples
the two sets are *paired* (image i of each: the same prompt and seed), and both sides take the
same weights: resampling the student's side alone would break the pairing and put every
resample far above the point (a student close to its teacher image by image scored 0.013 with
resamples at 1.6-1.8). Against a reference folder (unrelated images) only the student's side is
re-weighted, the reference fixed. KID's spread is torchmetrics': mean +- one standard deviation
over its random subsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.stats import Bootstrap, Estimate

FEATURES = ("inception", "clip", "pixels")
PIXELS_SIDE = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default; smaller sets use half their images per subset
BATCH = 32
FID_RESAMPLES = 500
FID_CHUNK = 50  # resamples per fid_replicates call: each holds (chunk, N, N) float64 matrices


@dataclass(frozen=True)
class Extractor:
    """A feature extractor and the words that say how it sees images."""

    module: torch.nn.Module
    protocol: str


class PixelFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> (N, 3 * side * side) area-resized pixels in [0, 1]."""

    def __init__(self, side: int = PIXELS_SIDE) -> None:
        super().__init__()
        self.side = side
        self.num_features = 3 * side * side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float() / 255.0, self.side).flatten(1)


class ClipImageFeatures(torch.nn.Module):
    """uint8 images -> a CLIP model's image embeddings, preprocessed by its own processor."""

    def __init__(self, model, processor) -> None:
        super().__init__()
        self.model, self.processor = model, processor
        self.num_features = int(model.config.projection_dim)  # model: a clip.Projected

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels)


class _Given(torch.nn.Module):
    """Features already extracted pass through torchmetrics unchanged."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.num_features = dims

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def inception() -> Extractor:
    from torchmetrics.image.fid import NoTrainInceptionV3  # heavy: only when FID/KID are asked for

    try:
        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except ModuleNotFoundError as err:
        raise WorkbenchError(
            f"--fid-features inception needs torch-fidelity ({err}); `pip install torch-fidelity`, or "
            "choose --fid-features clip (with --clip-model) or pixels"
        ) from None
    return Extractor(module, "InceptionV3 pool3 2048-d (torch-fidelity FID weights), bilinear antialiased "
                     "resize to 299x299 (torchmetrics)")  # fmt: skip


def pixels() -> Extractor:
    return Extractor(PixelFeatures(), f"raw pixels area-resized to {PIXELS_SIDE}x{PIXELS_SIDE} RGB "
                     f"({3 * PIXELS_SIDE**2}-d); comparable only with itself, not with published FID")  # fmt: skip


def clip_features(model, processor, name: str) -> Extractor:  # name as it may be shown
    return Extractor(ClipImageFeatures(model, processor), f"CLIP image embeddings of {name} "
                     "(FD_CLIP), its processor's resize and centre crop")  # fmt: skip


def square(images: Sequence[Image.Image], size: int | None) -> list[Image.Image]:
    """``images`` centre-cropped to a square and resized to ``size`` x ``size`` (PIL bicubic), as
    BK-SDM scores its 512 px images at 256 px; unchanged for ``None``."""
    if size is None:
        return list(images)
    out = []
    for img in images:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        out.append(img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
    return out


def as_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> uint8 (N, 3, H, W)."""
    arrays = [np.array(img.convert("RGB"), dtype=np.uint8) for img in images]
    if len({a.shape for a in arrays}) > 1:
        raise WorkbenchError("images of one set must share a size; resize the reference folder's images")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def extract(images: Sequence[Image.Image], module: torch.nn.Module, batch: int = BATCH) -> torch.Tensor:
    """(N, D) float64 features of ``images``, extracted ``batch`` at a time."""
    if not images:
        raise WorkbenchError("no images to extract features from")
    module.eval()
    chunks = [module(as_uint8(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat([c.reshape(c.shape[0], -1) for c in chunks]).double()


def reference_images(folder: str | Path, count: int | None = None) -> list[Image.Image]:
    """``count`` images (all by default) of an image folder, spread evenly over its sorted
    file names, so a given count always picks the same files."""
    root = Path(folder)
    if not root.is_dir():
        raise WorkbenchError(f"--reference {str(folder)!r} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise WorkbenchError(f"--reference {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if count is not None:
        if not 2 <= count <= len(files):
            raise WorkbenchError(f"--reference-count {count}: the folder has {len(files)} images; "
                                 f"give a number between 2 and {len(files)}")  # fmt: skip
        files = [files[i * len(files) // count] for i in range(count)]
    return [_open(p) for p in files]


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise WorkbenchError(f"cannot read the reference image {str(path)!r}: {err}") from None


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID between two feature sets (N, D)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _enough(real, fake, "FID")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float, int, int]:
    """torchmetrics' KID (mean, std over subsets, subsets, subset size); seeded subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _enough(real, fake, "KID")
    # Subsets of a whole set would all be the set itself (std 0): at most half of the smaller one.
    size = max(2, min(KID_SUBSET_SIZE, len(real) // 2, len(fake) // 2))
    metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), KID_SUBSETS, size


def _enough(real: torch.Tensor, fake: torch.Tensor, what: str) -> None:
    if len(real) < 2 or len(fake) < 2:
        raise WorkbenchError(f"{what} needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    if real.shape[1] != fake.shape[1]:
        raise WorkbenchError(f"{what}: feature sizes differ ({real.shape[1]} vs {fake.shape[1]})")


def fid_replicates(real: torch.Tensor, fake: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """FID of each re-weighting of the fake set (``weights``: (B, N) sample counts).

    Exact and cheap for N << D: with the fake covariance written as ``A A^T`` (A: D x N),
    ``tr sqrt(S_r S_f)`` is the sum of square roots of the eigenvalues of the N x N matrix
    ``A^T S_r A``, built from ``M = X S_r X^T`` without touching a D x D product per resample.
    """
    r, x = real.double(), fake.double()
    mu_r = r.mean(0)
    s_r = torch.cov(r.T).reshape(r.shape[1], r.shape[1])
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64))  # (B, N)
    total = w.sum(1, keepdim=True)
    p = w / total  # (B, N) weights of the weighted mean
    m = p @ x  # (B, D) resampled means
    big_m = x @ s_r @ x.T  # (N, N)
    mp = p @ big_m  # (B, N): row b is M p_b
    pmp = (mp * p).sum(1, keepdim=True)  # (B, 1)
    centred = big_m[None] - mp[:, None, :] - mp[:, :, None] + pmp[:, :, None]  # (B, N, N)
    d = (w / (total - 1).clamp_min(1e-12)).sqrt()  # (B, N)
    inner = centred * d[:, :, None] * d[:, None, :]
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum(1)
    sq = ((x[None] - m[:, None, :]) ** 2).sum(2)  # (B, N)
    trace_f = (w * sq).sum(1) / (total[:, 0] - 1).clamp_min(1e-12)
    mean_term = ((m - mu_r) ** 2).sum(1)
    return (mean_term + s_r.trace() + trace_f - 2 * trace_sqrt).numpy()


def paired_fid_replicates(real: torch.Tensor, fake: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """FID of each re-weighting of paired sets (``weights``: (B, N) sample counts, the same
    for row i of ``real`` and of ``fake``).

    With both covariances written as ``A A^T`` and ``B B^T`` (D x N), ``tr sqrt(S_f S_r)`` is
    the nuclear norm of the N x N matrix ``A^T B``, built from the cross Gram ``K = X Y^T``.
    """
    x, y = fake.double(), real.double()
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64))  # (B, N)
    total = w.sum(1, keepdim=True)
    p = w / total
    mx, my = p @ x, p @ y  # (B, D)
    k = x @ y.T  # (N, N)
    pk, kp = p @ k, p @ k.T  # (B, N): p^T K and K p
    pkp = (pk * p).sum(1, keepdim=True)  # (B, 1)
    centred = k[None] - pk[:, None, :] - kp[:, :, None] + pkp[:, :, None]  # (B, N, N)
    d = (w / (total - 1).clamp_min(1e-12)).sqrt()
    trace_sqrt = torch.linalg.svdvals(centred * d[:, :, None] * d[:, None, :]).sum(1)
    denominator = (total[:, 0] - 1).clamp_min(1e-12)
    trace_f = (w * ((x[None] - mx[:, None, :]) ** 2).sum(2)).sum(1) / denominator
    trace_r = (w * ((y[None] - my[:, None, :]) ** 2).sum(2)).sum(1) / denominator
    return (((mx - my) ** 2).sum(1) + trace_r + trace_f - 2 * trace_sqrt).numpy()


def fid_estimate(real: torch.Tensor, fake: torch.Tensor, bootstrap: Bootstrap, paired: bool = False) -> Estimate:
    """torchmetrics' FID with a cluster-bootstrap interval over prompts: of both sides with the
    same weights where the sets are ``paired`` (the teacher's images of the same samples), of
    the fake side alone otherwise (a reference folder)."""
    point = fid(real, fake)
    weights = bootstrap.weights[:FID_RESAMPLES]  # in chunks: 648 images x 500 resamples at once take 5 GB
    replicates = paired_fid_replicates if paired else fid_replicates
    reps = np.concatenate(
        [replicates(real, fake, weights[i : i + FID_CHUNK]) for i in range(0, len(weights), FID_CHUNK)]
    )
    tail = (1 - bootstrap.level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail], method="inverted_cdf")
    return Estimate(point, float(min(low, point)), float(max(high, point)), len(fake))


def summary(real: torch.Tensor, fake: torch.Tensor, bootstrap: Bootstrap | None,
            metrics: Sequence[str], paired: bool = False) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``fid`` and/or ``kid`` of ``fake`` against ``real``, each an estimate dict with its n's;
    ``paired``: row i of each is the same sample (``fid_estimate``)."""
    out: dict[str, dict[str, Any]] = {}
    if "fid" in metrics:
        est = (
            fid_estimate(real, fake, bootstrap, paired=paired)
            if bootstrap is not None
            else _point(fid(real, fake), len(fake))
        )
        out["fid"] = est.to_dict() | {"reference_n": len(real)}
    if "kid" in metrics:
        mean, std, subsets, size = kid(real, fake)
        out["kid"] = {"mean": mean, "low": mean - std, "high": mean + std, "n": len(fake),
                      "reference_n": len(real), "subsets": subsets, "subset_size": size}  # fmt: skip
    return out


def _point(value: float, n: int) -> Estimate:
    return Estimate(value, value, value, n)
