"""What a distillation trains on, encoded once and cached on disk.

Sources:
- ``toy``: the toy world's procedural captioned images (training split only);
- a folder of images with captions, in ``metadata.jsonl`` (``file_name``, ``text``: the
  imagefolder convention) or in ``.txt`` files beside each image;
- a text file of prompts, one per line, whose images the teacher pipeline draws first.

The VAE latents (mean and std of the posterior, so each step can draw a fresh sample)
and the text embeddings are computed once and saved; training steps run neither the VAE
nor the text encoders. SDXL's micro-conditioning is kept per image: original size, crop
top-left and target size (``time_ids``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1
Progress = Callable[[float, str], None]


@dataclass
class LatentCache:
    """Tensors for N training examples, on CPU."""

    latent_mean: torch.Tensor  # (N, C, h, w), already multiplied by the VAE scaling factor
    latent_std: torch.Tensor  # (N, C, h, w)
    prompt_embeds: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor | None  # (N, P): SDXL's pooled text embedding
    time_ids: torch.Tensor | None  # (N, 6): original h, w, crop top, left, target h, w
    uncond_embeds: torch.Tensor  # (L, D): what classifier-free guidance feeds for no prompt
    uncond_pooled: torch.Tensor | None  # (P,)
    captions: list[str]

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def save(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self._tensors().items() if v is not None}
        save_file(tensors, folder / "data.safetensors.tmp")
        (folder / "data.safetensors.tmp").replace(folder / "data.safetensors")
        meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "captions": self.captions}
        (folder / "data.json").write_text(json.dumps(meta), encoding="utf-8")

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "latent_mean": self.latent_mean,
            "latent_std": self.latent_std,
            "prompt_embeds": self.prompt_embeds,
            "pooled": self.pooled,
            "time_ids": self.time_ids,
            "uncond_embeds": self.uncond_embeds,
            "uncond_pooled": self.uncond_pooled,
        }

    @classmethod
    def load(cls, folder: Path, fingerprint: dict[str, Any]) -> LatentCache | None:
        """The cache in ``folder`` if it was built from the same data and models, else None."""
        from safetensors.torch import load_file

        meta_path, data_path = folder / "data.json", folder / "data.safetensors"
        if not (meta_path.exists() and data_path.exists()):
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        t = load_file(data_path)
        return cls(
            t["latent_mean"], t["latent_std"], t["prompt_embeds"], t.get("pooled"), t.get("time_ids"),
            t["uncond_embeds"], t.get("uncond_pooled"), meta["captions"],
        )  # fmt: skip


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Example:
    """One training image before encoding: a loader and its caption."""

    caption: str
    load: Callable[[], Any]  # -> PIL.Image


def toy_examples(n: int, seed: int) -> list[Example]:
    import random

    from workbench.toy import world

    rng = random.Random(seed)
    scenes = world.train_scenes()
    picks = [(world.sample_scene(rng, scenes), rng.randrange(2**31)) for _ in range(n)]
    return [Example(s.caption, lambda s=s, r=r: world.render(s, seed=r)) for s, r in picks]


def folder_examples(folder: str | Path) -> list[Example]:
    """Images with captions from ``metadata.jsonl`` or ``.txt`` sidecars; precise errors."""
    root = Path(folder)
    if not root.is_dir():
        raise WorkbenchError(f"data folder {str(root)!r} does not exist or is not a folder")
    captions = _metadata_captions(root) if (root / "metadata.jsonl").exists() else _sidecar_captions(root)
    if not captions:
        raise WorkbenchError(
            f"data folder {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)}) with captions"
        )
    return [Example(text, lambda p=path: _open_image(p)) for path, text in captions]


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def _metadata_captions(root: Path) -> list[tuple[Path, str]]:
    out = []
    for n, line in enumerate((root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path, text = root / row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WorkbenchError(
                f"metadata.jsonl line {n} must be a JSON object with 'file_name' and 'text'"
            ) from None
        if not path.exists():
            raise WorkbenchError(f"metadata.jsonl line {n} names {row['file_name']!r}, which does not exist")
        if not isinstance(text, str) or not text.strip():
            raise WorkbenchError(f"metadata.jsonl line {n}: caption of {row['file_name']!r} is empty")
        out.append((path, text.strip()))
    return out


def _sidecar_captions(root: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [p.name for p in images if not p.with_suffix(".txt").exists()]
    if missing:
        raise WorkbenchError(
            f"{len(missing)} image(s) in {str(root)!r} have no caption: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; add NAME.txt beside each image or a metadata.jsonl"
        )
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"prompt file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise WorkbenchError(f"prompt file {str(path)!r} has no prompts (one per line)")
    return prompts


def check_source(source: str) -> None:
    """Cheap checks of a data source (``toy``, an image folder, a prompt file); loads no model."""
    if source == "toy":
        return
    path = Path(source)
    if path.suffix == ".txt" and not path.is_dir():
        prompt_file(path)
    else:
        folder_examples(path)


def teacher_examples(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> list[Example]:
    """The teacher draws one image per prompt (seed + line number), kept in memory."""
    from workbench.sampling import generate

    images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps=steps, guidance=guidance)
    return [Example(p, lambda img=img: img) for p, img in zip(prompts, images)]


# --------------------------------------------------------------------------- encoding


def _to_tensor(img, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Resize the short side to ``resolution`` and centre-crop: (3, R, R) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return arr, (h, w, top, left)


def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds (B, L, D), pooled (B, P) or None) exactly as the pipeline computes them."""
    with torch.no_grad():
        out = pipe.encode_prompt(
            prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    if hasattr(pipe, "text_encoder_2"):  # SDXL: (embeds, neg, pooled, neg_pooled)
        return out[0].cpu().float(), out[2].cpu().float()
    return out[0].cpu().float(), None


def _uncond(pipe, embeds: torch.Tensor, pooled: torch.Tensor | None):
    """What the pipeline feeds for classifier-free guidance: zeros (SDXL default) or ''."""
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return torch.zeros_like(embeds[0]), None if pooled is None else torch.zeros_like(pooled[0])
    e, p = encode_text(pipe, [""])
    return e[0], None if p is None else p[0]


def encode_examples(
    pipe, examples: list[Example], resolution: int, batch: int = 16, progress: Progress | None = None
) -> LatentCache:
    """Run the VAE and text encoders once over ``examples``."""
    vae = pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean", "std", "embeds", "pooled", "time")}
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        pixels, geo = zip(*(_to_tensor(e.load(), resolution) for e in chunk))
        with torch.no_grad():
            dist = vae.encode(torch.stack(pixels).to(pipe.device, vae.dtype)).latent_dist
        parts["mean"].append(((dist.mean - shift) * scale).cpu().float())
        parts["std"].append((dist.std * scale).cpu().float())
        embeds, pooled = encode_text(pipe, [e.caption for e in chunk])
        parts["embeds"].append(embeds)
        if pooled is not None:
            parts["pooled"].append(pooled)
            parts["time"].append(
                torch.tensor([[h, w, top, left, resolution, resolution] for h, w, top, left in geo]).float()
            )
        if progress:
            progress(min(1.0, (start + len(chunk)) / len(examples)), "encoding images and captions")
    pooled = torch.cat(parts["pooled"]) if parts["pooled"] else None
    embeds = torch.cat(parts["embeds"])
    uncond, uncond_pooled = _uncond(pipe, embeds, pooled)
    return LatentCache(
        torch.cat(parts["mean"]), torch.cat(parts["std"]), embeds, pooled,
        torch.cat(parts["time"]) if parts["time"] else None, uncond, uncond_pooled,
        [e.caption for e in examples],
    )  # fmt: skip
