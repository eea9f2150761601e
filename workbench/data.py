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

Training batches (``Batches``) are a pure function of (seed, step, micro-batch, rank): a
seeded permutation per epoch picks the examples, a generator seeded from the same numbers
draws the latent sample, noise, timesteps and prompt dropout. Resuming needs no loader state.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.files import atomic_write, write_json_atomic
from workbench.progress import Progress, report
from workbench.toy import world

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1


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

        tensors = {k: v.contiguous() for k, v in self._tensors().items() if v is not None}
        atomic_write(folder / "data.safetensors", lambda tmp: save_file(tensors, tmp))
        meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "captions": self.captions}
        write_json_atomic(folder / "data.json", meta, indent=None)

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


def data_fingerprint(config, base_location: str, resolution: int) -> dict[str, Any]:
    """What the cached tensors of a run (a ``DistillConfig``) were built from."""
    data = config.data
    if data != "toy":
        path = Path(data)
        data = {"path": str(path.resolve()), "mtime": path.stat().st_mtime if path.exists() else None}
    found = {
        "base": base_location,
        "data": data,
        "n": config.toy_samples,
        "seed": config.seed,
        "res": resolution,
    }
    if is_prompt_file(config.data):  # the teacher drew the images: how, too
        found["drawn"] = {"steps": config.teacher_image_steps, "guidance": config.image_guidance}
    return found


def is_prompt_file(source: str) -> bool:
    """Whether a data source names a prompt file (the teacher draws its images)."""
    return source != "toy" and Path(source).suffix == ".txt" and not Path(source).is_dir()


def build_examples(config, pipe, resolution: int, progress: Progress | None = None) -> list[Example]:
    """The examples a run (a ``DistillConfig``) trains on, not yet encoded. From a prompt file,
    the teacher draws them at ``resolution`` px (the run's; never larger than it trains on)."""
    if config.data == "toy":
        return toy_examples(config.toy_samples, config.seed)
    if is_prompt_file(config.data):
        prompts, steps, guidance = prompt_file(config.data), config.teacher_image_steps, config.image_guidance
        report(progress, 0.0, f"the teacher draws {len(prompts)} training images at {resolution}px with "
                              f"{steps} steps, guidance {guidance:g} (--teacher-image-steps, "
                              f"--teacher-image-guidance)")  # fmt: skip
        return teacher_examples(pipe, prompts, config.seed, steps, guidance, resolution)
    return folder_examples(config.data)


def check_source(source: str) -> None:
    """Cheap checks of a data source (``toy``, an image folder, a prompt file); loads no model."""
    if source == "toy":
        return
    if is_prompt_file(source):
        prompt_file(source)
    else:
        folder_examples(source)


def teacher_examples(pipe, prompts: list[str], seed: int, steps: int, guidance: float,
                     size: int | None = None) -> list[Example]:  # fmt: skip
    """The teacher draws one image per prompt (seed + line number), ``size`` px square (None:
    the UNet's native size), kept in memory."""
    from workbench.sampling import generate  # heavy (diffusers' pipelines, transformers): only to draw

    seeds = [seed + i for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, height=size, width=size)
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


def training_data(config, pipe, resolution: int, base_location: str, folder: Path, *, encode: bool,
                  progress: Progress | None = None) -> LatentCache:  # fmt: skip
    """A run's (a ``DistillConfig``) encoded examples, read from ``folder``; if they are missing
    or stale and ``encode``, encoded now (once) and saved there."""
    fingerprint = data_fingerprint(config, base_location, resolution)
    cache = LatentCache.load(folder, fingerprint)
    if cache is None and encode:
        report(progress, 0.0, f"encoding training data once ({config.data})")
        examples = build_examples(config, pipe, resolution, progress)
        cache = encode_examples(pipe, examples, resolution, progress=progress)
        cache.save(folder, fingerprint)
    if cache is None:
        raise WorkbenchError(f"the training data in {folder} is missing or was built from other data")
    return cache


# --------------------------------------------------------------------------- batches


def batch_indices(n: int, global_batch: int, step: int, micro: int, accum: int, seed: int) -> torch.Tensor:
    """Example indices of micro-batch ``micro`` of optimizer step ``step`` (all processes).

    Consecutive slices of an endless stream of per-epoch permutations, so any step's data
    is known from the step number alone: resuming needs no data-loader state.
    """
    start = (step * accum + micro) * global_batch
    idx = []
    while len(idx) < global_batch:
        epoch, offset = divmod(start + len(idx), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx.extend(perm[offset : offset + global_batch - len(idx)].tolist())
    return torch.tensor(idx)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank) % 2**63)


def noise_and_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Noisy latents and the training target the scheduler's prediction type asks for."""
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, t)
    raise WorkbenchError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")


@dataclass(frozen=True)
class Batches:
    """One process's training batches: ``batches(step, micro)`` is micro-batch ``micro`` of
    optimizer step ``step``, noised, on ``device``."""

    cache: LatentCache
    noise_schedule: Any  # a DDPM scheduler with the teacher's noise schedule (add_noise, targets)
    batch_size: int  # per process
    accum: int
    seed: int
    uncond_prob: float
    world: int = 1
    rank: int = 0
    device: Any = "cpu"
    consistency: bool = False  # also the inputs of consistency distillation (``losses.lcd_targets``)

    @staticmethod
    def schedule_of(scheduler_config) -> Any:
        """The training noise schedule of a pipeline's scheduler (whatever its sampler)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler_config)

    def __call__(self, step: int, micro: int) -> dict[str, Any]:
        c = self.cache
        idx = batch_indices(len(c), self.batch_size * self.world, step, micro, self.accum, self.seed)
        idx = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        gen = step_generator(self.seed, step, micro, self.rank)
        b = len(idx)
        latents = c.latent_mean[idx] + c.latent_std[idx] * torch.randn(
            c.latent_mean[idx].shape, generator=gen
        )
        noise = torch.randn(latents.shape, generator=gen)  # (B, C, h, w)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < self.uncond_prob  # classifier-free guidance dropout
        embeds = torch.where(drop[:, None, None], c.uncond_embeds, c.prompt_embeds[idx])
        noisy, target = noise_and_target(self.noise_schedule, latents, noise, t)
        inputs: dict[str, Any] = {"sample": noisy, "timestep": t, "encoder_hidden_states": embeds}
        if c.pooled is not None:
            pooled = torch.where(drop[:, None], c.uncond_pooled, c.pooled[idx])
            inputs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": c.time_ids[idx]}
        batch = {"inputs": to_device(inputs, self.device), "target": target.to(self.device)}
        if self.consistency:  # drawn last: the KD batch above is the same with or without it
            batch["consistency"] = to_device(self.consistency_inputs(idx, latents, noise, gen), self.device)
        return batch

    def consistency_inputs(self, idx: torch.Tensor, latents, noise, gen: torch.Generator) -> dict[str, Any]:
        """Clean latents, noise, a uniform draw per example (its guidance scale), and the text
        inputs of its prompt (never dropped) and of the empty prompt (the guided teacher)."""
        u = torch.rand(len(idx), generator=gen)
        return {"latents": latents, "noise": noise, "u": u, "cond": self.text(idx, drop=False),
                "uncond": self.text(idx, drop=True)}  # fmt: skip

    def text(self, idx: torch.Tensor, drop: bool) -> dict[str, Any]:
        """The UNet's text inputs for examples ``idx``: their prompts, or the empty prompt's."""
        c, b = self.cache, len(idx)
        embeds = c.uncond_embeds.expand(b, *c.uncond_embeds.shape) if drop else c.prompt_embeds[idx]
        out: dict[str, Any] = {"encoder_hidden_states": embeds}
        if c.pooled is not None:
            pooled = c.uncond_pooled.expand(b, *c.uncond_pooled.shape) if drop else c.pooled[idx]
            out["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": c.time_ids[idx]}
        return out


def to_device(tree: Any, device) -> Any:
    """Tensors of a nested dict moved to ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree
