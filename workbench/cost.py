"""Parameters and FLOPs of UNet configs, counted on the meta device.

``FlopCounterMode`` on meta tensors counts every matmul, convolution and attention
(on real CPU tensors it misses the fused attention kernel), costs no memory, and gives
per-module counts, so one teacher forward prices every catalog unit.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from workbench import cache
from workbench.catalog import FIGURES_SCHEMA, REST, Catalog, meta_unet
from workbench.errors import WorkbenchError

TEXT_TOKENS = 77  # CLIP context length used by every SD-family pipeline


# Image side at most, in px: 16x SDXL's native 1024. Far larger sides overflow torch's size
# arithmetic even on the meta device ("Storage size calculation overflowed").
MAX_RESOLUTION = 16384


def latent_size(config: dict[str, Any], resolution: int, vae_scale_factor: int = 8) -> int:
    """Latent side for a square image of ``resolution`` px; errors name the valid step and range."""
    factor = vae_scale_factor * 2 ** (len(config["down_block_types"]) - 1)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % factor:
        raise WorkbenchError(
            f"resolution {resolution!r} px is not valid for this UNet: it must be a positive "
            f"multiple of {factor} (VAE factor {vae_scale_factor} x UNet factor {factor // vae_scale_factor})"
        )
    if resolution > MAX_RESOLUTION:
        raise WorkbenchError(f"resolution {resolution} px is too large: at most {MAX_RESOLUTION} px")
    return resolution // vae_scale_factor


def dummy_inputs(
    config: dict[str, Any], latent: int, batch: int = 1, device=None, dtype=None
) -> dict[str, Any]:
    """Inputs of the right shapes for one UNet forward (random values)."""
    import torch

    kw = {"device": device, "dtype": dtype}
    cross = config.get("cross_attention_dim") or 768
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.get("in_channels", 4), latent, latent, **kw),  # (B, C, h, w)
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, cross, **kw),  # (B, 77, D)
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, **kw),  # (B, pooled)
            "time_ids": torch.randn(batch, 6, **kw),  # (B, 6): original, crop, target size
        }
    return inputs


def flops_by_module(config: dict[str, Any], latent: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of one forward per module path ("" is the whole model), on the meta device."""
    # Loader bookkeeping (``_name_or_path``...) is not structure: one cache entry per UNet shape.
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return dict(_flops_cached(json.dumps(clean, sort_keys=True, default=list), latent, batch))


@lru_cache(maxsize=64)
def _flops_cached(config_json: str, latent: int, batch: int) -> tuple[tuple[str, int], ...]:
    """Remembered on disk too (``cache`` kind ``figures``): counting imports diffusers."""
    key = f"flops {latent} {batch} {config_json}"
    pairs = cache.remembered("figures", key, FIGURES_SCHEMA, lambda: _count_flops(config_json, latent, batch))
    return tuple((name, int(n)) for name, n in pairs)


def _count_flops(config_json: str, latent: int, batch: int) -> list[tuple[str, int]]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    model = meta_unet(config)
    prefix = type(model).__name__
    with torch.device("meta"):
        inputs = dummy_inputs(config, latent, batch)
        counter = FlopCounterMode(display=False, depth=None)
        with counter, torch.no_grad():
            model(**inputs)
    out = {"": counter.get_total_flops()}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(prefix + "."):
            out[name[len(prefix) + 1 :]] = sum(ops.values())
    return list(out.items())


def unet_flops(config: dict[str, Any], resolution: int, vae_scale_factor: int = 8, batch: int = 1) -> int:
    """FLOPs of one UNet forward at ``resolution`` px (square), counted exactly on meta."""
    return flops_by_module(config, latent_size(config, resolution, vae_scale_factor), batch)[""]


def atom_flops(catalog: Catalog, resolution: int, vae_scale_factor: int = 8) -> dict[str, int]:
    """FLOPs per catalog atom (ResNet, attention shell, transformer block, rest)."""
    by_module = flops_by_module(catalog.config, latent_size(catalog.config, resolution, vae_scale_factor))
    out = {a: by_module.get(a, 0) for a in catalog.atom_params if a != REST}
    for atom in list(out):
        if ".transformer_blocks." in atom:
            out[atom.rsplit(".transformer_blocks.", 1)[0]] -= out[atom]  # attention shell alone
    out[REST] = by_module[""] - sum(out.values())
    return out


def unit_flops(catalog: Catalog, resolution: int, vae_scale_factor: int = 8) -> dict[str, int]:
    """FLOPs per removable unit at ``resolution``."""
    per_atom = atom_flops(catalog, resolution, vae_scale_factor)
    return {u.id: sum(per_atom[a] for a in u.atoms) for u in catalog.units}


def flops_without(per_atom: dict[str, int], removed_atoms: frozenset[str] | set[str]) -> int:
    """A student's FLOPs from the teacher's per-atom counts (exact: kept shapes never change)."""
    return sum(v for a, v in per_atom.items() if a not in removed_atoms)


def level_shifts(spec) -> dict[str, int]:
    """Student atom -> how many levels finer it runs than its teacher atom (0 for most).

    A removed whole stage takes a downsampler with it: every kept atom below it (inner
    stages, the mid block) runs at twice the side it ran at in the teacher.
    """
    n, m = len(spec.teacher_topology.down), len(spec.topology.down)

    def level(atom: str, stages: int) -> int:
        kind, _, rest = atom.partition(".")
        if kind == "mid_block":
            return stages - 1
        index = int(rest.split(".")[0])
        return index if kind == "down_blocks" else stages - 1 - index

    return {s: level(t, n) - level(s, m) for s, t in spec.layer_map.items()}


def student_flops(spec, per_atom: dict[str, int], per_atom_at=None) -> int:
    """A student's FLOPs, exact: the teacher's per-atom counts of the atoms it keeps, each
    counted at the level the student runs it at. ``per_atom_at(d)`` gives the teacher's
    per-atom counts at ``2**d`` times the resolution (needed only after a whole-stage removal)."""
    shifts = level_shifts(spec)
    if not any(shifts.values()):
        return flops_without(per_atom, spec.removed_atoms)
    if per_atom_at is None:
        raise WorkbenchError("this plan removes a whole stage: its FLOPs need counts at other resolutions")
    tables = {d: per_atom if d == 0 else per_atom_at(d) for d in set(shifts.values())}
    return per_atom.get(REST, 0) + sum(tables[shifts[s]][t] for s, t in spec.layer_map.items())
