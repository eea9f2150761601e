"""Which of the field's metrics an evaluation computes, with what, and how each was computed.

Per-sample metrics join the checker's verdicts and PSNR/SSIM in ``Scores.values`` (so
they get the same paired bootstrap intervals): ``clip`` and ``pickscore`` for the teacher
and a student alike, ``lpips`` for a student against the teacher's image of the same
sample. Set metrics (``fid``, ``kid``) compare a whole image set with a reference: the
``--reference`` image folder when given (the teacher is then scored too), else the
teacher's own images (only a student is scored). PSNR and SSIM are always computed for a
student (they need no weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import workbench.evaluation.clip as cliplib
import workbench.evaluation.distribution as distribution
import workbench.evaluation.perceptual as perceptual
from workbench.errors import WorkbenchError
from workbench.progress import Progress, report
from workbench.stats import Bootstrap

METRICS = ("fid", "kid", "clip", "pickscore", "lpips", "psnr", "ssim")
SET_METRICS = ("fid", "kid")
DEFAULT = ("psnr", "ssim")


def parse(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"fid,clip"`` (or a list) -> ``("fid", "clip")``, checked against ``METRICS``."""
    if text is None:
        return DEFAULT
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise WorkbenchError(f"--metrics {text!r}: unknown {', '.join(unknown) or 'empty list'}; "
                             f"choose from {', '.join(METRICS)} (comma-separated)")  # fmt: skip
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Metrics:
    """The chosen metrics and what they need; validated on creation (nothing loads yet)."""

    names: tuple[str, ...] = DEFAULT
    clip_model: str | None = None
    pickscore_model: str = cliplib.PICKSCORE_MODEL
    pickscore_processor: str | None = cliplib.PICKSCORE_PROCESSOR
    fid_features: str = "inception"
    feature_module: torch.nn.Module | None = None  # any extractor; overrides fid_features
    reference: str | None = None
    reference_count: int | None = None
    eval_size: int | None = None  # FID/KID/CLIP/PickScore see every image cropped and resized to this

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", parse(list(self.names)))
        if self.eval_size is not None and not 16 <= self.eval_size <= 4096:
            raise WorkbenchError(f"--eval-size {self.eval_size}: give a side in pixels between 16 and 4096")
        if self.fid_features not in distribution.FEATURES:
            raise WorkbenchError(f"--fid-features {self.fid_features!r}: choose from "
                                 f"{', '.join(distribution.FEATURES)}")  # fmt: skip
        needs_clip = "clip" in self.names or (self.wants_sets and self.fid_features == "clip"
                                              and self.feature_module is None)  # fmt: skip
        if needs_clip and not self.clip_model:
            raise WorkbenchError("the clip metric and --fid-features clip need --clip-model (a local CLIP "
                                 "folder or a hub id such as openai/clip-vit-large-patch14)")  # fmt: skip
        if self.reference is not None and not self.wants_sets:
            raise WorkbenchError(
                "--reference is the image folder FID/KID compare with: add fid or kid to --metrics"
            )

    @property
    def wants_sets(self) -> bool:
        return any(n in self.names for n in SET_METRICS)

    def check_available(self) -> None:
        """Refuse, before any image is drawn, a metric whose package is missing."""
        if "lpips" in self.names:
            perceptual.check()
        if self.wants_sets:
            self.reference_features  # noqa: B018 - loads the extractor and reads the folder: fail now

    @cached_property
    def extractor(self) -> distribution.Extractor:
        if self.feature_module is not None:
            return distribution.Extractor(
                self.feature_module, f"custom extractor {type(self.feature_module).__name__}"
            )
        if self.fid_features == "inception":
            return distribution.inception()
        if self.fid_features == "clip":
            c = cliplib.load(self.clip_model)
            return distribution.clip_features(c.model, c.processor, shown(c.name))
        return distribution.pixels()

    @cached_property
    def reference_features(self) -> torch.Tensor | None:
        if self.reference is None:
            return None
        images = distribution.reference_images(self.reference, self.reference_count)
        return distribution.extract(distribution.square(images, self.eval_size), self.extractor.module)

    def protocol(self) -> dict[str, str]:
        """One sentence per chosen metric: model, resizing, counts."""
        out = self._protocol()
        if self.eval_size:
            size = f"; every image first centre-cropped and resized to {self.eval_size}x{self.eval_size} (bicubic)"
            out = {k: v + (size if k in (*SET_METRICS, "clip", "pickscore") else "") for k, v in out.items()}
        return out

    def _protocol(self) -> dict[str, str]:
        out: dict[str, str] = {}
        against = (f"reference folder {shown(self.reference)!r}" + (f" ({self.reference_count} images, spread "
                   "over its sorted files)" if self.reference_count else " (all images)")
                   if self.reference else "the teacher's images of the same prompts and seeds")  # fmt: skip
        if self.wants_sets:
            features = self.extractor.protocol if "extractor" in self.__dict__ else self._features_words()
            if "fid" in self.names:
                out["fid"] = (f"torchmetrics FrechetInceptionDistance on {features}; against {against}; "
                              f"interval: cluster bootstrap over prompts of the scored set "
                              f"({distribution.FID_RESAMPLES} resamples)")  # fmt: skip
            if "kid" in self.names:
                out["kid"] = (f"torchmetrics KernelInceptionDistance on {features}; against {against}; "
                              f"{distribution.KID_SUBSETS} subsets of min({distribution.KID_SUBSET_SIZE}, "
                              "half the smaller set) images, seed 0 (subset_size in the figure); interval: mean +- 1 std "
                              "over subsets")  # fmt: skip
        if "clip" in self.names:
            out["clip"] = f"torchmetrics CLIPScore (100 * cosine) with {shown(self.clip_model)}, per sample"
        if "pickscore" in self.names:
            out["pickscore"] = (f"exp(logit_scale) * cosine with {shown(self.pickscore_model)} (processor "
                                f"{shown(self.pickscore_processor or self.pickscore_model)}), per sample")  # fmt: skip
        if "lpips" in self.names:
            out["lpips"] = perceptual.PROTOCOL + ", student vs the teacher's image of the same sample"
        return out

    def _features_words(self) -> str:
        return {"inception": "InceptionV3 pool3 2048-d (torch-fidelity weights), resized to 299x299",
                "clip": f"CLIP image embeddings of {shown(self.clip_model)}",
                "pixels": f"raw pixels area-resized to {distribution.PIXELS_SIDE}x{distribution.PIXELS_SIDE}",
                }[self.fid_features]  # fmt: skip


def shown(name: str | None) -> str | None:
    """A hub id as it is; a local folder by its name only (records travel with exports, which
    must hold no local paths)."""
    if name is None or not Path(name).expanduser().exists():
        return name
    return Path(name).expanduser().resolve().name


def teacher_scores(metrics: Metrics, images: Sequence[Image.Image], prompts: Sequence[str],
                   progress: Progress | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-sample prompt-image scores of any image set (teacher or student)."""
    out = {}
    images = distribution.square(images, metrics.eval_size) if any(
        n in metrics.names for n in ("clip", "pickscore")) else images  # fmt: skip
    if "clip" in metrics.names:
        report(progress, 1.0, "scoring: CLIP score")
        out["clip"] = cliplib.clip_score(cliplib.load(metrics.clip_model), images, prompts)
    if "pickscore" in metrics.names:
        report(progress, 1.0, "scoring: PickScore")
        model = cliplib.load(metrics.pickscore_model, metrics.pickscore_processor)
        out["pickscore"] = cliplib.pickscore(model, images, prompts)
    return out


def student_scores(metrics: Metrics, images: Sequence[Image.Image], teacher: Sequence[Image.Image],
                   prompts: Sequence[str], progress: Progress | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """A student's per-sample scores: the prompt-image ones and LPIPS to the teacher."""
    out = teacher_scores(metrics, images, prompts, progress)
    if "lpips" in metrics.names:
        report(progress, 1.0, "scoring: LPIPS")
        out["lpips"] = perceptual.lpips(images, teacher)
    return out


def set_metrics(metrics: Metrics, images: Sequence[Image.Image], teacher: Sequence[Image.Image] | None,
                bootstrap: Bootstrap, who: str, progress: Progress | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """FID/KID of ``images`` against the reference folder, or else against ``teacher`` (the
    teacher itself, ``teacher`` None, is then not scored)."""
    if not metrics.wants_sets or (metrics.reference is None and teacher is None):
        return {}
    report(progress, 1.0, f"scoring: {who} features for FID/KID")
    real, paired = metrics.reference_features, False
    if real is None:  # the teacher's images of the same samples: paired with the student's
        real = distribution.extract(distribution.square(teacher, metrics.eval_size), metrics.extractor.module)
        paired = True
    fake = distribution.extract(distribution.square(images, metrics.eval_size), metrics.extractor.module)
    return distribution.summary(real, fake, bootstrap, metrics.names, paired=paired)
