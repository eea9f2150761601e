"""The structure of a ``UNet2DConditionModel`` config, read the way diffusers reads it.

diffusers accepts several spellings of the same structure (``layers_per_block`` as an
int or a list, ``transformer_layers_per_block`` as an int, a list of ints, or a list of
per-layer lists with ``reverse_transformer_layers_per_block`` for the up path). This
module expands any of them into one explicit ``Topology``: per stage, the block type,
the number of layers and the transformer depth of each layer. Everything else in the
workbench reasons about that, and writes configs back through ``to_config_fields``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError

# Block types the workbench can prune, and their attention-free twin.
DOWN_ATTENTION_TWIN = {"CrossAttnDownBlock2D": "DownBlock2D"}
UP_ATTENTION_TWIN = {"CrossAttnUpBlock2D": "UpBlock2D"}
SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


@dataclass(frozen=True)
class Stage:
    """One down or up stage: its block type, and the transformer depth of each layer.

    ``depths`` has one entry per layer; it is ``None`` for a stage without attention.
    """

    path: str  # "down_blocks.1" / "up_blocks.0"
    block_type: str
    num_layers: int
    depths: tuple[int, ...] | None

    @property
    def has_attention(self) -> bool:
        return self.depths is not None


@dataclass(frozen=True)
class Topology:
    """The prunable structure of a UNet: stages, layers, transformer depths, mid block."""

    down: tuple[Stage, ...]
    up: tuple[Stage, ...]
    mid_type: str | None
    mid_depth: int  # transformer depth of the mid block's attention (0 when it has none)

    def signature(self) -> dict[str, Any]:
        """Plain-data fingerprint used to check that a plan fits a model (widths excluded)."""

        def stage(s: Stage) -> dict[str, Any]:
            return {
                "type": s.block_type,
                "layers": s.num_layers,
                "depths": list(s.depths) if s.depths is not None else None,
            }

        return {
            "down": [stage(s) for s in self.down],
            "mid": {"type": self.mid_type, "depth": self.mid_depth},
            "up": [stage(s) for s in self.up],
        }

    def describe(self) -> str:
        """One-line human summary, e.g. ``down [D2, X2x2, X2x10] mid X10 up [...]``."""

        def stage(s: Stage) -> str:
            if not s.has_attention:
                return f"{s.num_layers} layers"
            depths = sorted(set(s.depths or ()))
            depth = "/".join(map(str, depths))
            return f"{s.num_layers} layers x depth {depth}"

        mid = {None: "none", "UNetMidBlock2D": "1 ResNet"}.get(self.mid_type, f"depth {self.mid_depth}")
        down = ", ".join(stage(s) for s in self.down)
        up = ", ".join(stage(s) for s in self.up)
        return f"down [{down}], mid [{mid}], up [{up}]"


def _per_stage(value: Any, n: int, key: str) -> list[Any]:
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, (list, tuple)) and len(value) == n:
        return list(value)
    raise WorkbenchError(f"config key {key!r} must be an int or a list of {n} entries, got {value!r}")


def _layer_depths(entry: Any, num_layers: int, key: str) -> tuple[int, ...]:
    if isinstance(entry, int):
        return (entry,) * num_layers
    if isinstance(entry, (list, tuple)) and len(entry) == num_layers:
        return tuple(int(d) for d in entry)
    raise WorkbenchError(
        f"config key {key!r}: a stage with {num_layers} layers needs an int or "
        f"{num_layers} depths, got {entry!r}"
    )


def _check_types(config: dict[str, Any]) -> None:
    for key, allowed in (("down_block_types", SUPPORTED_DOWN), ("up_block_types", SUPPORTED_UP)):
        for block_type in config[key]:
            if block_type not in allowed:
                raise WorkbenchError(
                    f"unsupported {key} entry {block_type!r}: the workbench prunes UNets "
                    f"built from {', '.join(allowed)}"
                )
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in SUPPORTED_MID:
        raise WorkbenchError(
            f"unsupported mid_block_type {config['mid_block_type']!r}: expected one of "
            f"{', '.join(str(m) for m in SUPPORTED_MID)}"
        )


def topology_of(config: dict[str, Any]) -> Topology:
    """Expand a ``UNet2DConditionModel`` config into an explicit ``Topology``."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise WorkbenchError(f"expected a UNet2DConditionModel config, got {config.get('_class_name')!r}")
    _check_types(config)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    n = len(down_types)
    if len(up_types) != n:
        raise WorkbenchError(f"{n} down stages but {len(up_types)} up stages")
    layers = _per_stage(config.get("layers_per_block", 2), n, "layers_per_block")
    tlpb = _per_stage(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    reverse = config.get("reverse_transformer_layers_per_block")
    up_tlpb = list(reversed(tlpb)) if reverse is None else _per_stage(reverse, n, "reverse_tlpb")
    up_layers = list(reversed(layers))
    down = tuple(
        Stage(
            path=f"down_blocks.{i}",
            block_type=t,
            num_layers=layers[i],
            depths=_layer_depths(tlpb[i], layers[i], "transformer_layers_per_block")
            if t in DOWN_ATTENTION_TWIN
            else None,
        )
        for i, t in enumerate(down_types)
    )
    up = tuple(
        Stage(
            path=f"up_blocks.{i}",
            block_type=t,
            num_layers=up_layers[i] + 1,
            depths=_layer_depths(up_tlpb[i], up_layers[i] + 1, "reverse_transformer_layers_per_block")
            if t in UP_ATTENTION_TWIN
            else None,
        )
        for i, t in enumerate(up_types)
    )
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    last = tlpb[-1]
    mid_depth = (last if isinstance(last, int) else last[0]) if mid_type == SUPPORTED_MID[0] else 0
    return Topology(down=down, up=up, mid_type=mid_type, mid_depth=int(mid_depth))


def to_config_fields(teacher_config: dict[str, Any], topo: Topology) -> dict[str, Any]:
    """Config keys that express ``topo``, in the simplest spelling diffusers accepts.

    Ints where every layer of every stage agrees and the up path mirrors the down path
    (as SDXL and KOALA write it); otherwise per-layer lists for stages with attention
    plus an explicit ``reverse_transformer_layers_per_block`` (as SSD-1B writes it).
    """
    old_tlpb = _per_stage(
        teacher_config.get("transformer_layers_per_block", 1),
        len(topo.down),
        "transformer_layers_per_block",
    )
    old_up = list(reversed(old_tlpb))
    reverse_old = teacher_config.get("reverse_transformer_layers_per_block")
    if reverse_old is not None:
        old_up = list(reverse_old)

    def plain(entry: Any) -> int:
        return entry if isinstance(entry, int) else int(entry[0])

    down_entries: list[Any] = []
    for i, s in enumerate(topo.down):
        if s.depths is not None:
            down_entries.append(list(s.depths))
        elif i == len(topo.down) - 1 and topo.mid_type == SUPPORTED_MID[0]:
            down_entries.append(topo.mid_depth)  # mid depth follows the last down stage
        else:
            down_entries.append(plain(old_tlpb[i]))
    up_entries: list[Any] = [
        list(s.depths) if s.depths is not None else plain(old_up[i]) for i, s in enumerate(topo.up)
    ]
    layers = [s.num_layers for s in topo.down]
    fields: dict[str, Any] = {
        "down_block_types": [s.block_type for s in topo.down],
        "up_block_types": [s.block_type for s in topo.up],
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "mid_block_type": topo.mid_type,
    }
    flat_down = [_uniform(e) for e in down_entries]
    flat_up = [_uniform(e) for e in up_entries]
    symmetric = (
        None not in flat_down
        and None not in flat_up
        and all(flat_up[i] == flat_down[-1 - i] for i, s in enumerate(topo.up) if s.has_attention)
    )
    if symmetric:
        fields["transformer_layers_per_block"] = flat_down
        fields["reverse_transformer_layers_per_block"] = None
    else:
        fields["transformer_layers_per_block"] = [
            e if s.has_attention else plain(e) for e, s in zip(down_entries, topo.down)
        ]
        fields["reverse_transformer_layers_per_block"] = up_entries
    return fields


def _uniform(entry: Any) -> int | None:
    """The single depth of a stage entry, or None when its layers differ."""
    if isinstance(entry, int):
        return entry
    return entry[0] if len(set(entry)) == 1 else None
