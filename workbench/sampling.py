"""Generate images with identical noise for teacher and student.

Each image gets its own freshly seeded generator, so image *i* depends only on its
prompt and seed, never on batch composition or on what ran before. That is what
makes same-seed teacher/student comparisons (PSNR, SSIM) meaningful.

Schedulers (``workbench.schedulers``): ``default`` is the pipeline's own, ``lcm`` diffusers'
``LCMScheduler`` on the pipeline's noise schedule. A student with LCM's w-conditioning
(``time_cond_proj_dim``) gets the guidance scale as an embedding and is called once per step
(the stock pipeline does this): guidance-free.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.files import atomic_write
from workbench.models import check_unet_folder, load_unet_folder
from workbench.negative import (
    NASA_POOLED_SCALE,
    NASA_SCALE,
    check_scale,
    negative_away,
    pooled_negative,
    takes_pooled,
)
from workbench.schedulers import check_sampler, is_w_conditioned, make_scheduler
from workbench.toy import world

# What a swapped-in UNet must share with the pipeline's own for sampling to work.
_INTERFACE_KEYS = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


def _initial_latents(
    pipe: StableDiffusionXLPipeline, seeds: Sequence[int], height: int, width: int
) -> torch.Tensor:
    """Starting noise, one seeded generator per image, drawn in the pipeline's layout."""
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def generate(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    negative_prompt: str | None = None,
    unet: UNet2DConditionModel | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 16,
    scheduler: str = "default",
    nasa_scale: float = NASA_SCALE,
    nasa_pooled_scale: float = NASA_POOLED_SCALE,
) -> list[Image.Image]:
    """One image per (prompt, seed); with ``unet``, that UNet runs in place of the
    pipeline's own, with ``scheduler`` in place of its scheduler (both are put back
    afterwards, even on error). A negative prompt goes into classifier-free guidance; when
    sampling is guidance-free (a w-conditioned student, or guidance <= 1) it goes into the
    cross-attention instead (NASA, ``workbench.negative``) with ``nasa_scale``, and for an
    SDXL-family UNet into its pooled text embedding with ``nasa_pooled_scale``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    check_sampler(scheduler, steps)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    original, original_scheduler = pipe.unet, pipe.scheduler
    try:  # from here on, whatever fails puts the pipeline's own UNet and scheduler back
        pipe.scheduler = make_scheduler(scheduler, original_scheduler)
        # a teacher UNet set aside on a CPU run (meta device, models.TeacherPipeline) stands
        # only for its config: the student draws where and in the dtype it is
        if unet is not None and original.device.type != "meta":
            if unet.dtype != original.dtype or unet.device != original.device:
                # A copy: Module.to works in place, and the caller's UNet may be a student in
                # training (fp32) that a bf16 pipeline must not round. Only when needed:
                # diffusers warns about every dtype cast through .to().
                unet = copy.deepcopy(unet).to(device=original.device, dtype=original.dtype)
        if unet is not None:
            pipe.unet = unet
        steer, negative_prompt = _steering(pipe, negative_prompt, guidance, nasa_scale, nasa_pooled_scale)
        images: list[Image.Image] = []
        with steer:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                latents = _initial_latents(pipe, seeds[start : start + batch_size], height, width)
                images += _draw(pipe, chunk, negative_prompt, steps, guidance, height, width, latents)
        return images
    finally:
        pipe.unet, pipe.scheduler = original, original_scheduler


def _steering(pipe, negative_prompt: str | None, guidance: float, scale: float, pooled_scale: float):
    """(context to sample in, negative prompt for the pipeline): guidance-free sampling (a
    w-conditioned UNet, or guidance <= 1) has no unconditional pass, so NASA takes the
    negative prompt into the cross-attention and, for SDXL-family UNets, the pooled text
    embedding; guided sampling passes it to the pipeline."""
    if not negative_prompt or not (is_w_conditioned(pipe.unet) or guidance <= 1):
        return contextlib.nullcontext(), negative_prompt
    scale, pooled_scale = check_scale(scale), check_scale(pooled_scale, "NASA pooled scale")
    encode = functools.partial(pipe.encode_prompt, device=pipe.device, num_images_per_prompt=1,
                               do_classifier_free_guidance=False)  # fmt: skip
    with torch.no_grad():
        encoded = encode(negative_prompt)  # SDXL family: (embeds, _, pooled, _); SD 1.x/2.x: (embeds, _)
        pooled = pooled_negative(encoded[2], encode("")[2]) if takes_pooled(pipe.unet) else None
    return negative_away(pipe.unet, encoded[0], scale, pooled, pooled_scale), None


def _draw(pipe, chunk: list[str], negative_prompt, steps, guidance, height, width, latents) -> list:
    return pipe(
        prompt=chunk,
        negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        # The pipeline multiplies by the scheduler's initial sigma itself.
        latents=latents.to(device=pipe.unet.device, dtype=pipe.unet.dtype),
        output_type="pil",
    ).images


def load_student_unet(folder: str | Path, like: UNet2DConditionModel) -> UNet2DConditionModel:
    """A student UNet folder (diffusers ``save_pretrained``) that can stand in for ``like``.

    Checks the interface the pipeline relies on (latent channels, text width, added
    conditioning), so a student of another base fails with a clear message instead
    of a shape error deep inside the denoising loop.
    """
    path = check_unet_folder(folder)
    config = UNet2DConditionModel.load_config(path)
    for key in _INTERFACE_KEYS:
        if config.get(key) != like.config.get(key):
            raise WorkbenchError(
                f"--unet {str(path)!r} has {key}={config.get(key)!r} but the base needs "
                f"{like.config.get(key)!r}; give a student made from this base"
            )
    unet = load_unet_folder(path, dtype=like.dtype)
    return unet.to(like.device).eval()


# --------------------------------------------------------------------------- training sample grids


def default_prompts(base: str, data: str) -> list[str]:
    """Four prompts for a run's sample grids: held-out toy captions for the toy, else generic."""
    if base == "toy" or data == "toy":
        scenes = world.held_out_scenes()
        return [s.caption for s in scenes[:: max(1, len(scenes) // 4)]][:4]
    return ["a photo of a cat", "a watercolor landscape", "a red sports car", "a bowl of fruit"]


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Images pasted edge to edge, one row per list."""
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            out.paste(img, (c * w, r * h))
    return out


SAMPLER_KEYS = frozenset({"scheduler", "steps", "guidance"})  # what a grid's student row may change


class SampleGrids:
    """Teacher (top row) vs student (bottom row) on fixed prompts and seeds, saved as
    ``folder/step_NNNNNNN.png``. The teacher row is drawn once, when first needed, with the
    pipeline's scheduler; the student row with ``student_sampler`` (``generate`` keywords that
    override the grid's: scheduler, steps, guidance; e.g. ``{"scheduler": "lcm", "steps": 4}``
    for a consistency-distilled student) when given, else the same. Both rows are ``size`` px
    square (a run's training resolution; None: the UNet's native size). Prompt i is drawn with
    seed ``first_seed + i`` in both rows."""

    def __init__(self, pipe, folder: Path, prompts: Sequence[str], *, steps: int, guidance: float,
                 student_sampler: dict[str, Any] | None = None, size: int | None = None,
                 first_seed: int = 0) -> None:  # fmt: skip
        self.pipe, self.folder, self.prompts = pipe, Path(folder), list(prompts)
        self.seeds = range(first_seed, first_seed + len(self.prompts))
        self.kw = {"steps": steps, "guidance": guidance, "height": size, "width": size}
        self.student_sampler = student_sampler

    @functools.cached_property
    def teacher_row(self) -> list[Image.Image]:
        return generate(self.pipe, self.prompts, self.seeds, **self.kw)

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:07d}.png"

    def save(self, student: UNet2DConditionModel, step: int, sampler: dict[str, Any] | None = None) -> Path:
        """The grid of ``step``; ``sampler`` (``generate`` keywords) overrides the student row's."""
        if unknown := set(sampler or {}) - SAMPLER_KEYS:
            raise ValueError(f"sample grid sampler keys {sorted(unknown)}; use {sorted(SAMPLER_KEYS)}")
        was_training = student.training
        student.eval()
        kw = self.kw | (sampler or self.student_sampler or {})
        try:
            row = generate(self.pipe, self.prompts, self.seeds, unet=student, **kw)
        finally:
            student.train(was_training)
        image = grid([self.teacher_row, row])
        return atomic_write(self.path(step), lambda tmp: image.save(tmp, format="PNG"))
