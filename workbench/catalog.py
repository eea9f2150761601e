"""Every unit a user may remove from a UNet, with its exact parameter count.

Parameters are counted on the meta device (no weights, no memory). Each parameter is
assigned to exactly one *atom*: a ResNet (``down_blocks.1.resnets.0``), the shell of an
attention module (its norm and projections: ``down_blocks.1.attentions.0``), one
transformer block (``down_blocks.1.attentions.0.transformer_blocks.3``), or ``rest``
(embeddings, conv in/out), or a stage's down/upsampler (``down_blocks.1.downsamplers.0``).
A removable unit is a set of atoms, so the size of any plan is the total minus the atoms
its units cover, computed exactly without building.

Unit ids are diffusers' dotted module paths; the one pseudo-path is a *layer*,
``down_blocks.1.layers.0`` = ``resnets.0`` plus ``attentions.0`` of that stage (diffusers
keeps them in two lists but removes them together). A *stage* unit, ``down_blocks.3``,
is a whole down stage with its mirrored up stage and one sampler on each side: the
student has one stage (one ``block_out_channels`` entry) fewer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from workbench import cache
from workbench.libraries import load
from workbench.topology import Stage, Topology, topology_of

REST = "rest"
_ATOM = re.compile(
    r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
    r"(?:\.transformer_blocks\.(\d+))?"
)

KINDS = {
    "layer": "a (ResNet, attention) layer of a stage; removing a down layer also removes one "
    "layer of the mirrored up stage",
    "transformer_block": "one transformer block inside an attention module",
    "stage_attention": "all attention of a stage (the block type loses its cross-attention)",
    "mid_attention": "the mid block's attention and second ResNet (leaves one ResNet)",
    "mid_block": "the whole mid block",
    "stage": "a whole down stage with its mirrored up stage and the samplers between them "
    "(block_out_channels loses an entry)",
}


@dataclass(frozen=True)
class Unit:
    """A removable unit: its id (dotted diffusers path), where it sits, and its size."""

    id: str
    stage: str  # "down_blocks.1", "mid_block", "up_blocks.0"
    kind: str  # one of KINDS
    params: int
    atoms: frozenset[str] = field(repr=False)
    parent: str | None = None  # the unit that contains it, for display as a tree

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stage": self.stage,
            "kind": self.kind,
            "params": self.params,
            "parent": self.parent,
        }


@dataclass(frozen=True)
class Catalog:
    """The removable units of one UNet config, and the exact parameter accounting."""

    config: dict[str, Any] = field(repr=False, compare=False)
    topology: Topology
    units: tuple[Unit, ...]
    atom_params: dict[str, int] = field(repr=False, compare=False)
    by_id: dict[str, Unit] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {u.id: u for u in self.units})

    @property
    def total_params(self) -> int:
        return sum(self.atom_params.values())

    @property
    def rest_params(self) -> int:
        return self.atom_params.get(REST, 0)

    def unit(self, unit_id: str) -> Unit:
        return self.by_id[unit_id]

    def params_without(self, atoms: set[str] | frozenset[str]) -> int:
        """Parameter count once ``atoms`` are gone."""
        return self.total_params - sum(self.atom_params.get(a, 0) for a in atoms)


def atom_of(param_name: str) -> str:
    """The atom a parameter (or module) path belongs to."""
    m = _ATOM.match(param_name)
    if not m:
        return REST
    stage, kind, idx, block = m.groups()
    if kind == "attentions" and block is not None:
        return f"{stage}.attentions.{idx}.transformer_blocks.{block}"
    return f"{stage}.{kind}.{idx}"


def build_catalog(config: dict[str, Any]) -> Catalog:
    """Catalog a ``UNet2DConditionModel`` config (cached; about 0.2 s for SDXL)."""
    # Loader bookkeeping (``_name_or_path``, ``_diffusers_version``) is not structure.
    clean = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    return _build_cached(json.dumps(clean, sort_keys=True, default=list))


@lru_cache(maxsize=16)
def _build_cached(config_json: str) -> Catalog:
    config = json.loads(config_json)
    topo = topology_of(config)
    atom_params = count_atom_params(config)
    units = _units(topo, atom_params)
    return Catalog(config=config, topology=topo, units=tuple(units), atom_params=atom_params)


FIGURES_SCHEMA = 2  # 2: samplers are atoms of their own (whole-stage removal)


def count_atom_params(config: dict[str, Any]) -> dict[str, int]:
    """Parameters per atom, counted on a meta-device build of ``config`` (remembered on disk:
    the count imports diffusers, seconds of an app's start)."""

    key = "atom-params " + json.dumps(config, sort_keys=True, default=list)
    return cache.remembered("figures", key, FIGURES_SCHEMA, lambda: _count_atom_params(config))


def _count_atom_params(config: dict[str, Any]) -> dict[str, int]:
    model = meta_unet(config)
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        atom = atom_of(name)
        counts[atom] = counts.get(atom, 0) + p.numel()
    return counts


def meta_unet(config: dict[str, Any]):
    """Build ``config`` on the meta device: real structure, no memory, no weights."""
    import torch

    (unet_class,) = load("diffusers", "UNet2DConditionModel")  # under the libraries' import lock
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return unet_class.from_config(clean)


def _stage_units(stage: Stage, atom_params: dict[str, int]) -> list[Unit]:
    units: list[Unit] = []
    attention_atoms: set[str] = set()
    for j in range(stage.num_layers):
        layer_atoms = {f"{stage.path}.resnets.{j}"}
        block_units: list[Unit] = []
        if stage.depths is not None:
            attn = f"{stage.path}.attentions.{j}"
            blocks = {f"{attn}.transformer_blocks.{k}" for k in range(stage.depths[j])}
            layer_atoms |= {attn} | blocks
            attention_atoms |= {attn} | blocks
            layer_id = f"{stage.path}.layers.{j}"
            block_units = [
                _unit(f"{attn}.transformer_blocks.{k}", stage.path, "transformer_block",
                      {f"{attn}.transformer_blocks.{k}"}, atom_params, parent=layer_id)
                for k in range(stage.depths[j])
            ]  # fmt: skip
        units.append(_unit(f"{stage.path}.layers.{j}", stage.path, "layer", layer_atoms, atom_params))
        units.extend(block_units)
    if attention_atoms:
        units.append(
            _unit(f"{stage.path}.attentions", stage.path, "stage_attention", attention_atoms, atom_params)
        )
    return units


def _mid_units(topo: Topology, atom_params: dict[str, int]) -> list[Unit]:
    mid_atoms = {a for a in atom_params if a.startswith("mid_block.")}
    if topo.mid_type is None:
        return []
    units = [_unit("mid_block", "mid_block", "mid_block", mid_atoms, atom_params)]
    if topo.mid_type == "UNetMidBlock2DCrossAttn":
        attn = "mid_block.attentions.0"
        blocks = {f"{attn}.transformer_blocks.{k}" for k in range(topo.mid_depth)}
        atoms = {attn, "mid_block.resnets.1"} | blocks
        units.append(_unit(attn, "mid_block", "mid_attention", atoms, atom_params, parent="mid_block"))
        units.extend(
            _unit(b, "mid_block", "transformer_block", {b}, atom_params, parent=attn)
            for b in sorted(blocks, key=natural_key)
        )
    return units


def whole_stage_atoms(topo: Topology, i: int, atoms: Iterable[str]) -> set[str]:
    """Atoms of down stage ``i``, its mirrored up stage, and the sampler on each side.

    One downsampler and one upsampler fewer: the stage's own (the innermost stage has no
    downsampler, so the one leading into it goes; the outermost up stage has no upsampler,
    so the one of the up stage before it goes).
    """
    n = len(topo.down)
    k = n - 1 - i
    down_sampler = f"down_blocks.{i if i < n - 1 else n - 2}.downsamplers.0"
    up_sampler = f"up_blocks.{k if k < n - 1 else n - 2}.upsamplers.0"
    prefixes = (f"down_blocks.{i}.", f"up_blocks.{k}.")
    return {a for a in atoms if a.startswith(prefixes)} | {down_sampler, up_sampler}


def _whole_stage_unit(topo: Topology, i: int, atom_params: dict[str, int]) -> Unit:
    atoms = whole_stage_atoms(topo, i, atom_params)
    return _unit(f"down_blocks.{i}", f"down_blocks.{i}", "stage", atoms, atom_params)


def _units(topo: Topology, atom_params: dict[str, int]) -> list[Unit]:
    units: list[Unit] = []
    for i, stage in enumerate(topo.down):
        if len(topo.down) > 1:  # diffusers needs at least one stage
            units.append(_whole_stage_unit(topo, i, atom_params))
        units.extend(_stage_units(stage, atom_params))
    units.extend(_mid_units(topo, atom_params))
    for stage in topo.up:
        units.extend(_stage_units(stage, atom_params))
    return units


def _unit(
    uid: str,
    stage: str,
    kind: str,
    atoms: set[str],
    atom_params: dict[str, int],
    parent: str | None = None,
) -> Unit:
    params = sum(atom_params.get(a, 0) for a in atoms)
    return Unit(uid, stage, kind, params, frozenset(atoms), parent)


def natural_key(s: str) -> list[Any]:
    """Sort key that orders ``blocks.10`` after ``blocks.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
