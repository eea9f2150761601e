"""Which scheduler a model samples with, and LCM's guidance (w) conditioning.

``default`` is the pipeline's own scheduler; ``lcm`` is diffusers' ``LCMScheduler`` on the
pipeline's noise schedule (betas, prediction type, zero-terminal-SNR rescaling) for
consistency-distilled students, at 1 to ``LCM_MAX_STEPS`` steps. Light: no diffusers import
until a scheduler is made, so commands can check their options before loading anything.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError

SCHEDULERS = ("default", "lcm")
LCM_MAX_STEPS = 8  # few-step sampling: 1, 2, 4 or 8 are usual
# The DDIM grid consistency distillation trains on (``losses.LCD``'s solver steps): LCM
# sampling picks its timesteps from this grid, so the two must agree.
LCM_ORIGINAL_STEPS = 50
# Denoising steps at most: the training schedule's timesteps (1000 for SDXL and SD 1.x/2.x); more
# steps only repeat timesteps, and a huge count would allocate its schedule before sampling.
MAX_STEPS = 1000


def check_sampler(scheduler: str, steps: int, flag: str = "--steps") -> None:
    """A scheduler name and a step count it can sample with (one-line errors)."""
    if scheduler not in SCHEDULERS:
        raise WorkbenchError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise WorkbenchError(f"{flag} must be a whole number of denoising steps >= 1, got {steps!r}")
    if steps > MAX_STEPS:
        raise WorkbenchError(
            f"{flag} {steps}: at most {MAX_STEPS} denoising steps (the training schedule's timesteps)"
        )
    if scheduler == "lcm" and steps > LCM_MAX_STEPS:
        raise WorkbenchError(
            f"{flag} {steps}: LCM sampling takes 1 to {LCM_MAX_STEPS} steps (1, 2, 4 or 8 are usual); "
            "use the default scheduler for more"
        )


def make_scheduler(name: str, like):
    """The scheduler ``name`` on ``like``'s noise schedule (``like`` itself for ``default``)."""
    if name == "default":
        return like
    from diffusers import LCMScheduler

    # LCM's own skipping schedule over the DDIM grid (timestep_spacing does not apply).
    config = {k: v for k, v in like.config.items() if k != "timestep_spacing"}
    return LCMScheduler.from_config(config, original_inference_steps=LCM_ORIGINAL_STEPS)


def is_w_conditioned(unet) -> bool:
    """Whether a UNet takes the guidance scale as an embedding (LCM's w-conditioning)."""
    return unet is not None and unet.config.get("time_cond_proj_dim") is not None


def guidance_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's w-embedding of guidance scales ``scale`` (B,) -> (B, dim): sinusoids of
    ``(scale - 1) * 1000``, exactly what the stock SDXL pipeline feeds a UNet with
    ``time_cond_proj_dim`` (``get_guidance_scale_embedding(guidance_scale - 1)``)."""
    w = (scale.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb
