"""The run's phases outside a stage's training step, for the memory estimate.

A stage's step (``workbench.memory``) is the peak of a long run on a GPU, but not always of
the whole run: before the first step the teacher's pipeline is resident whole while it
caches the data (and draws it, for a prompt file) and draws the teacher's row of the sample
grids; a stage is assembled beside the teacher it is built from; a sample grid brings the
text encoders and VAE back beside the student. Each phase here counts what the recipe
holds then, in the estimate's categories, and the activations of the drawing it does (one
UNet forward of the guided batch, the VAE's decoding or encoding, measured on the meta device
by the estimate's own tracker).

What the recipe lets go between phases (``models.TeacherPipeline``): beside a GPU, parts
set aside wait on the CPU (not counted: host memory); on a CPU run they leave memory and
come back from the base's files, so a CPU estimate counts only what is in use.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.catalog import meta_unet
from workbench.data import is_prompt_file, prompt_file
from workbench.libraries import load
from workbench.memory_tracker import CATEGORIES, Tracker

DRAW_BATCH = 16  # images a drawing makes at once: sampling.generate's and data.encode_examples' batch
GRID_PROMPTS = 4  # a run's sample grids: sampling.default_prompts


@dataclass(frozen=True)
class Phase:
    """What the run holds at one moment outside a step, by category."""

    name: str
    categories: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.categories.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "total_bytes": self.total, "categories_bytes": dict(self.categories)}


def _phase(name: str, **held: int) -> Phase:
    return Phase(name, {c: int(held.get(c, 0)) for c in CATEGORIES})


# --------------------------------------------------------------------------- drawing, on the meta device


def _key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)


def _activations(module: torch.nn.Module, run) -> int:
    """Peak bytes ``run()`` allocates beyond ``module``'s own tensors, on the meta device (no
    memory touched; a view of a weight is the weight's storage, not a new one)."""
    tracker = Tracker()
    for t in (*module.parameters(), *module.buffers()):
        tracker.claim(t, "weights")
    own = tracker.total
    with torch.no_grad(), torch.device("meta"), tracker:
        run()
    return max(total for total, _ in tracker.peaks.values()) - own


@functools.lru_cache(maxsize=32)
def unet_forward_bytes(config_key: str, batch: int, latent: int, text_len: int) -> int:
    """Peak activations of one UNet forward without gradients (a denoising step) at ``batch``."""
    config = json.loads(config_key)
    unet = meta_unet(config)
    with torch.device("meta"):
        inputs = _unet_inputs(config, batch, latent, text_len)
    return _activations(unet, lambda: unet(**inputs))


def _unet_inputs(config: dict[str, Any], b: int, latent: int, text_len: int) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "sample": torch.randn(b, config.get("in_channels", 4), latent, latent),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(b, text_len, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(b, pooled), "time_ids": torch.randn(b, 6)}
    return inputs


@functools.lru_cache(maxsize=32)
def vae_bytes(config_key: str, batch: int, resolution: int, decode: bool) -> int:
    """Peak activations of the VAE decoding (or encoding) ``batch`` images at ``resolution``."""
    config = json.loads(config_key)
    (vae_class,) = load("diffusers", "AutoencoderKL")
    with torch.device("meta"):
        vae = vae_class.from_config(config)
        factor = 2 ** (len(config.get("block_out_channels", [0])) - 1)
        if decode:
            x = torch.randn(
                batch, config.get("latent_channels", 4), resolution // factor, resolution // factor
            )
        else:
            x = torch.randn(batch, config.get("in_channels", 3), resolution, resolution)
    return _activations(vae, lambda: vae.decode(x) if decode else vae.encode(x))


def _vae_config(base) -> dict[str, Any] | None:
    path = Path(base.location or ".") / "vae" / "config.json"
    if base.kind in ("toy", "pipeline") and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def drawing_bytes(base, unet_config: dict[str, Any], images: int, resolution: int, text_len: int) -> int:
    """Activations of drawing ``images`` at ``resolution`` with guidance (the larger of a
    denoising step over the doubled batch and the VAE's decoding of the images)."""
    batch = min(images, DRAW_BATCH)
    latent = resolution // base.vae_scale_factor
    step = unet_forward_bytes(_key(unet_config), 2 * batch, latent, text_len)
    vae = _vae_config(base)
    decode = vae_bytes(_key(vae), batch, resolution, True) if vae else 0
    return max(step, decode)


# --------------------------------------------------------------------------- the phases


def data_images(config) -> tuple[int, bool]:
    """(images the data phase makes at once, whether the teacher draws them)."""
    if config.data != "toy" and is_prompt_file(config.data) and Path(config.data).is_file():
        return len(prompt_file(config.data)), True
    return DRAW_BATCH, False


def run_phases(
    config, base, specs, peaks, device: str, resolution: int, encoders: int, text_len: int
) -> tuple[Phase, ...]:
    """The phases outside a stage's step (see the module's docstring)."""
    pipeline_unet = 4 * specs[0].teacher_params  # fp32, as the pipeline loads it
    images, drawn = data_images(config)
    grid_prompts = len(config.sample_prompts) or GRID_PROMPTS
    vae = _vae_config(base)
    encoding = vae_bytes(_key(vae), min(images, DRAW_BATCH), resolution, False) if vae and not drawn else 0
    teacher_draws = drawing_bytes(base, base.unet_config, grid_prompts, resolution, text_len)
    if drawn:
        teacher_draws = max(
            teacher_draws, drawing_bytes(base, base.unet_config, images, resolution, text_len)
        )
    phases = [
        _phase(
            "the teacher's pipeline caches the data and draws the grids' teacher row",
            teacher=pipeline_unet,
            encoders=encoders,
            activations=max(encoding, teacher_draws),
        ),
    ]
    first = peaks[0]
    cast = 0 if config.teacher_dtype == "fp32" else 2 * first.teacher_params  # a bf16/fp16 copy beside it
    phases.append(
        _phase(
            "stage 1 is assembled (the student beside the teacher it is built from)",
            teacher=pipeline_unet + cast,
            weights=first.resident["weights"],
        )
    )
    phases.append(
        _grid_phase(config, base, specs, peaks, device, resolution, encoders, text_len, pipeline_unet)
    )
    return tuple(phases)


def _grid_phase(config, base, specs, peaks, device, resolution, encoders, text_len, pipeline_unet) -> Phase:
    """A sample grid: the text encoders and VAE back beside the student (and, mid-run, its
    optimizer states and teacher); beside a GPU the pipeline's UNet comes to the device too."""
    grid_prompts = len(config.sample_prompts) or GRID_PROMPTS
    draw = max(drawing_bytes(base, spec.config, grid_prompts, resolution, text_len) for spec in specs)
    if config.sample_every:  # mid-run: everything between steps stays resident
        held = max(peaks, key=lambda p: sum(p.resident.values())).resident
        resident = {
            "weights": held["weights"],
            "optimizer": held["optimizer_states"],
            "ema_target": held["ema_target"],
            "teacher": held["teacher"],
        }
    else:  # the end of the run: the final student alone
        resident = {"weights": max(p.resident["weights"] for p in peaks)}
    if device != "cpu":
        live_fp32 = (
            config.teacher_targets == "live" and config.teacher_dtype == "fp32" and config.sample_every
        )
        resident["teacher"] = resident.get("teacher", 0) + (0 if live_fp32 else pipeline_unet)
    return _phase(
        "a sample grid (the text encoders and VAE back beside the student)",
        encoders=encoders,
        activations=draw,
        **resident,
    )
