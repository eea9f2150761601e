"""Compile a plan into a student, and build that student from the teacher's weights.

``compile_plan`` is a pure function of (catalog, plan), fast enough to run on every UI
toggle: it checks every diffusers constraint, applies the natural defaults (the mirrored
up layer of a removed down layer, the mid depth that follows the last down stage) and
returns a ``StudentSpec``: a stock ``UNet2DConditionModel`` config, the teacher->student
layer map, and the exact parameter count. ``build_student`` then builds the student and
copies the weights by the map; nothing is touched until the spec is valid.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from workbench.catalog import REST, Catalog, atom_of, build_catalog, meta_unet, natural_key
from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan
from workbench.topology import (
    DOWN_ATTENTION_TWIN,
    UP_ATTENTION_TWIN,
    Stage,
    Topology,
    to_config_fields,
)

FEATURE_MODES = ("layer", "block", "self-attention", "none")


@dataclass(frozen=True)
class StudentSpec:
    """Everything about a student that follows from (teacher config, plan), without weights."""

    plan: PruningPlan
    config: dict[str, Any] = field(repr=False)
    topology: Topology = field(repr=False)
    removed: tuple[str, ...]  # the plan's units plus those applied by default
    auto_removed: tuple[str, ...]
    notes: tuple[str, ...]
    layer_map: dict[str, str] = field(repr=False)  # student atom -> teacher atom
    teacher_params: int
    student_params: int
    removed_atoms: frozenset[str] = field(repr=False)
    teacher_topology: Topology = field(repr=False)

    def teacher_name(self, student_name: str) -> str:
        """The teacher parameter/module path a student one inherits from."""
        atom = atom_of(student_name)
        if atom == REST:
            return student_name
        return self.layer_map[atom] + student_name[len(atom) :]

    def feature_pairs(self, mode: str = "layer") -> list[tuple[str, str]]:
        """(student module, teacher module) pairs whose outputs the feature loss matches.

        ``layer``: every kept ResNet and attention module (SSD-1B's layer-level loss);
        ``block``: each stage's output (BK-SDM); ``self-attention``: the last
        self-attention of each attention module (KOALA); ``none``: no pairs.
        """
        if mode not in FEATURE_MODES:
            raise WorkbenchError(f"unknown feature mode {mode!r}; choose one of {', '.join(FEATURE_MODES)}")
        if mode == "none":
            return []
        if mode == "block":
            return self._block_pairs()
        modules = sorted((s for s in self.layer_map if _is_layer_module(s)), key=natural_key)
        if mode == "layer":
            return [(s, self.layer_map[s]) for s in _in_forward_order(modules)]
        return self._self_attention_pairs(modules)

    def teacher_stage(self, student_stage: str) -> str:
        """The teacher stage a student stage inherits (``up_blocks.0`` <- ``up_blocks.1`` once
        the innermost stage is gone)."""
        return self.layer_map[f"{student_stage}.resnets.0"].rsplit(".resnets.", 1)[0]

    def _block_pairs(self) -> list[tuple[str, str]]:
        pairs = [self._stage_pair(s, i, self.teacher_topology.down) for i, s in enumerate(self.topology.down)]
        if self.topology.mid_type is not None:
            pairs.append(("mid_block", "mid_block"))
        return pairs + [
            self._stage_pair(s, i, self.teacher_topology.up) for i, s in enumerate(self.topology.up)
        ]

    def _stage_pair(self, stage: Stage, i: int, teacher_stages: tuple[Stage, ...]) -> tuple[str, str]:
        """A stage's output; before its sampler where only one of student and teacher stage
        has one (a removed whole stage took it): the resolutions differ after it."""
        teacher = self.teacher_stage(stage.path)
        student_last = i == len(self.topology.down) - 1
        teacher_last = int(teacher.split(".")[1]) == len(teacher_stages) - 1
        if student_last == teacher_last:
            return stage.path, teacher
        j = stage.num_layers - 1
        module = f"{stage.path}.{'attentions' if stage.has_attention else 'resnets'}.{j}"
        return module, self.layer_map[module]

    def _self_attention_pairs(self, modules: list[str]) -> list[tuple[str, str]]:
        depths = _attention_depths(self.teacher_topology)
        pairs = []
        for s in _in_forward_order([m for m in modules if ".attentions." in m]):
            student_last = _attention_depths(self.topology)[s] - 1
            teacher = self.layer_map[s]
            pairs.append(
                (
                    f"{s}.transformer_blocks.{student_last}.attn1",
                    f"{teacher}.transformer_blocks.{depths[teacher] - 1}.attn1",
                )
            )
        return pairs

    def summary(self) -> dict[str, Any]:
        return {
            "plan": self.plan.name,
            "removed": list(self.removed),
            "auto_removed": list(self.auto_removed),
            "notes": list(self.notes),
            "teacher_params": self.teacher_params,
            "student_params": self.student_params,
            "student_config": self.config,
        }


def _is_layer_module(atom: str) -> bool:
    """A ResNet or attention module (not a transformer block, not a sampler)."""
    return ".transformer_blocks." not in atom and (".resnets." in atom or ".attentions." in atom)


def _in_forward_order(paths: list[str]) -> list[str]:
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(paths, key=lambda p: (order[p.split(".")[0]], natural_key(p)))


def _attention_depths(topo: Topology) -> dict[str, int]:
    depths = {}
    for s in (*topo.down, *topo.up):
        for j, d in enumerate(s.depths or ()):
            depths[f"{s.path}.attentions.{j}"] = d
    if topo.mid_type == "UNetMidBlock2DCrossAttn":
        depths["mid_block.attentions.0"] = topo.mid_depth
    return depths


# --------------------------------------------------------------------------- compile


@dataclass
class _Work:
    """Mutable scratch state while compiling one plan."""

    catalog: Catalog
    removed: set[str]
    auto: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept_layers: dict[str, list[int]] = field(default_factory=dict)  # stage -> teacher idx


def compile_plan(catalog: Catalog, plan: PruningPlan) -> StudentSpec:
    """Validate ``plan`` against ``catalog`` and derive the student; raise on conflicts."""
    plan.check_fits(catalog)
    work = _Work(catalog, set(plan.removed))
    topo = catalog.topology
    n = len(topo.down)
    kept = _kept_stages(catalog, work.removed)  # teacher down stages, in order
    up_kept = [n - 1 - i for i in reversed(kept)]  # their mirrored up stages, in order
    widths = _widths(catalog.config)
    for i in kept:
        _keep_down_layers(work, topo.down[i], widths.down_in(i))
    for k in up_kept:
        _keep_up_layers(work, topo.up[k], topo.down[n - 1 - k], widths.up_in(k))
    down = tuple(_student_stage(work, topo.down[i], DOWN_ATTENTION_TWIN) for i in kept)
    up = tuple(_student_stage(work, topo.up[k], UP_ATTENTION_TWIN) for k in up_kept)
    mid_type, mid_blocks = _student_mid(work, down[-1])
    student_topo = Topology(
        down=tuple(replace(s, path=f"down_blocks.{q}") for q, s in enumerate(down)),
        up=tuple(replace(s, path=f"up_blocks.{q}") for q, s in enumerate(up)),
        mid_type=mid_type,
        mid_depth=len(mid_blocks),
    )
    layer_map = _layer_map(work, topo, kept, mid_type, mid_blocks)
    kept_atoms = set(layer_map.values()) | {REST}
    removed_atoms = frozenset(a for a in catalog.atom_params if a not in kept_atoms)
    reduced = without_stages(catalog.config, kept)
    config = {**reduced, **to_config_fields(reduced, student_topo)}
    return StudentSpec(
        plan=plan,
        config=config,
        topology=student_topo,
        removed=tuple(sorted(set(plan.removed) | set(work.auto), key=natural_key)),
        auto_removed=tuple(work.auto),
        notes=tuple(work.notes),
        layer_map=layer_map,
        teacher_params=catalog.total_params,
        student_params=catalog.params_without(removed_atoms),
        removed_atoms=removed_atoms,
        teacher_topology=topo,
    )


# Config keys with one entry per stage (down order; diffusers reverses them for the up path).
_PER_STAGE = (
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
)
_PER_UP_STAGE = ("up_block_types", "reverse_transformer_layers_per_block")


def without_stages(config: dict[str, Any], kept: list[int]) -> dict[str, Any]:
    """``config`` with only the down stages ``kept`` (and their mirrored up stages)."""
    n = len(config["down_block_types"])
    if list(kept) == list(range(n)):
        return dict(config)
    up_kept = [n - 1 - i for i in reversed(kept)]
    out = dict(config)
    for keys, order in ((_PER_STAGE, kept), (_PER_UP_STAGE, up_kept)):
        for key in keys:
            value = config.get(key)
            if isinstance(value, (list, tuple)) and len(value) == n:
                out[key] = [value[i] for i in order]
    return out


def _kept_stages(catalog: Catalog, removed: set[str]) -> list[int]:
    """The teacher's down stages the student keeps; raise where a stage cannot go."""
    topo = catalog.topology
    n = len(topo.down)
    gone = [i for i in range(n) if f"down_blocks.{i}" in removed]
    kept = [i for i in range(n) if i not in gone]
    if not gone:
        return kept
    ids = ", ".join(f"down_blocks.{i}" for i in gone)
    if not kept:
        raise WorkbenchError(
            f"{ids}: removing every stage leaves no UNet (diffusers needs at least one entry in "
            f"block_out_channels); keep one of them"
        )
    conflicts = stage_conflicts(catalog, kept, "mid_block" in removed)
    if conflicts:
        channels = list(catalog.config["block_out_channels"])
        removable = removable_stages(catalog, "mid_block" in removed)
        raise WorkbenchError(
            f"{ids}: diffusers cannot build this student from the teacher's weights: "
            f"{'; '.join(conflicts[:2])}. A stage can go only where its neighbours and the mid "
            f"block keep their widths (block_out_channels {channels}); removable alone here: "
            f"{', '.join(removable) or 'no stage'}"
        )
    return kept


def removable_stages(catalog: Catalog, mid_removed: bool = False) -> list[str]:
    """Stage units whose removal alone keeps every inherited module's widths."""
    n = len(catalog.topology.down)
    return [
        f"down_blocks.{i}"
        for i in range(n)
        if n > 1 and not stage_conflicts(catalog, [j for j in range(n) if j != i], mid_removed)
    ]


def stage_conflicts(catalog: Catalog, kept: list[int], mid_removed: bool = False) -> list[str]:
    """Why keeping only stages ``kept`` changes an inherited module's input width (empty: it doesn't)."""
    topo = catalog.topology
    channels = tuple(catalog.config["block_out_channels"])
    n = len(channels)
    teacher, student = _Widths(channels), _Widths(tuple(channels[i] for i in kept))
    out = []
    if channels[kept[0]] != channels[0]:
        out.append(
            f"conv_in, the time embedding and conv_out work at {channels[0]} channels, the first "
            f"kept stage at {channels[kept[0]]}"
        )
    if topo.mid_type is not None and not mid_removed and channels[kept[-1]] != channels[-1]:
        out.append(
            f"the mid block works at {channels[-1]} channels but would follow a stage of "
            f"{channels[kept[-1]]} (or remove mid_block too)"
        )
    up_kept = [n - 1 - i for i in reversed(kept)]
    sides = (("down", topo.down, kept, teacher.down_in, student.down_in),
             ("up", topo.up, up_kept, teacher.up_in, student.up_in))  # fmt: skip
    for side, stages, order, t_in, s_in in sides:
        for q, t in enumerate(order):
            layers = stages[t].num_layers
            for j in range(layers):
                want, got = t_in(t)(j, layers), s_in(q)(j, layers)
                if want != got:
                    out.append(
                        f"{side}_blocks.{t}.resnets.{j} takes {want} input channels but would get {got}"
                    )
    return out


@dataclass(frozen=True)
class _Widths:
    """Input widths of each layer's ResNet, from ``block_out_channels`` as diffusers wires it."""

    channels: tuple[int, ...]

    def down_in(self, i: int):
        out = self.channels[i]
        stage_in = self.channels[i - 1] if i > 0 else self.channels[0]
        return lambda j, n: stage_in if j == 0 else out

    def up_in(self, k: int):
        rev = self.channels[::-1]
        out = rev[k]
        prev = rev[k - 1] if k > 0 else self.channels[-1]
        skip = rev[min(k + 1, len(rev) - 1)]
        return lambda j, n: (prev if j == 0 else out) + (skip if j == n - 1 else out)


def _widths(config: dict[str, Any]) -> _Widths:
    return _Widths(tuple(config["block_out_channels"]))


def _layer_id(stage: Stage, j: int) -> str:
    return f"{stage.path}.layers.{j}"


def _fits(kept: list[int], n: int, width) -> bool:
    """Can student layer q inherit teacher layer kept[q] for every q (same ResNet shapes)?"""
    return all(width(t, n) == width(q, len(kept)) for q, t in enumerate(kept))


def _keep_down_layers(work: _Work, stage: Stage, width) -> None:
    n = stage.num_layers
    gone = [j for j in range(n) if _layer_id(stage, j) in work.removed]
    kept = [j for j in range(n) if j not in gone]
    if not kept:
        raise WorkbenchError(
            f"{stage.path}: all {n} layers are removed, but diffusers needs at least one layer "
            f"per stage (layers_per_block >= 1); keep one of "
            f"{', '.join(_layer_id(stage, j) for j in range(n))}"
        )
    if not _fits(kept, n, width):
        alt = _valid_removal(n, len(gone), width)
        raise WorkbenchError(
            f"{', '.join(_layer_id(stage, j) for j in gone)}: removing this leaves "
            f"{_layer_id(stage, kept[0])} as the stage's first layer, but its ResNet takes "
            f"{width(kept[0], n)} input channels where the first ResNet of {stage.path} takes "
            f"{width(0, n)}; remove {_ids(stage, alt)} instead"
        )
    work.kept_layers[stage.path] = kept


def _keep_up_layers(work: _Work, stage: Stage, mirror: Stage, width) -> None:
    n = stage.num_layers
    need = mirror.num_layers - len(work.kept_layers[mirror.path])
    chosen = [j for j in range(n) if _layer_id(stage, j) in work.removed]
    if len(chosen) > need:
        raise WorkbenchError(
            f"{_ids(stage, chosen)}: {stage.path} can only lose as many layers as its mirrored "
            f"down stage {mirror.path} ({need}), because each up layer consumes one skip "
            f"connection from it; also remove a layer of {mirror.path}, or keep "
            f"{_ids(stage, chosen[need:])}"
        )
    gone = _choose_up_removal(stage, mirror, chosen, need, width, work)
    if gone is None:
        raise WorkbenchError(
            f"{_ids(stage, chosen)}: no way to remove {need} layer(s) of {stage.path} including "
            f"these keeps every ResNet's input width; remove {_ids(stage, _valid_removal(n, need, width))}"
        )
    extra = [j for j in gone if j not in chosen]
    if extra:
        ids = [_layer_id(stage, j) for j in extra]
        work.auto.extend(ids)
        work.notes.append(
            f"removed {', '.join(ids)} too: {mirror.path} lost {need} layer(s), and each up "
            f"layer consumes one of its skip connections (diffusers builds layers_per_block+1 "
            f"up layers); chose the layer that consumed the removed skip where shapes allow"
        )
    work.kept_layers[stage.path] = [j for j in range(n) if j not in gone]


def _choose_up_removal(
    stage: Stage, mirror: Stage, chosen: list[int], need: int, width, work: _Work
) -> list[int] | None:
    """The valid removal set with the user's choices that best keeps skips paired."""
    n = stage.num_layers
    m = mirror.num_layers
    mirrored = [m - 1 - j for j in range(m) if j not in work.kept_layers[mirror.path]]
    best = None
    for combo in itertools.combinations(range(n), need):
        if not set(chosen) <= set(combo):
            continue
        kept = [j for j in range(n) if j not in combo]
        if not _fits(kept, n, width):
            continue
        cost = sum(min(abs(j - t) for t in mirrored) for j in combo)
        if best is None or cost < best[0]:
            best = (cost, list(combo))
    return None if best is None else best[1]


def _valid_removal(n: int, count: int, width) -> list[int]:
    for combo in itertools.combinations(reversed(range(n)), count):
        if _fits([j for j in range(n) if j not in combo], n, width):
            return sorted(combo)
    return []


def _ids(stage: Stage, idx: list[int]) -> str:
    return ", ".join(_layer_id(stage, j) for j in idx) or "nothing"


def _kept_blocks(work: _Work, attn: str, depth: int) -> list[int]:
    return [k for k in range(depth) if f"{attn}.transformer_blocks.{k}" not in work.removed]


def _student_stage(work: _Work, stage: Stage, twins: dict[str, str]) -> Stage:
    kept = work.kept_layers[stage.path]
    if stage.depths is None or f"{stage.path}.attentions" in work.removed:
        block_type = twins.get(stage.block_type, stage.block_type)
        return Stage(stage.path, block_type, len(kept), None)
    depths = []
    for j in kept:
        attn = f"{stage.path}.attentions.{j}"
        blocks = _kept_blocks(work, attn, stage.depths[j])
        if not blocks:
            raise WorkbenchError(
                f"{attn}: all {stage.depths[j]} transformer blocks are removed, but a "
                f"transformer depth of 0 still builds the attention module in diffusers; keep "
                f"one block, or remove the stage's attention as a whole ({stage.path}.attentions)"
            )
        depths.append(len(blocks))
    return Stage(stage.path, stage.block_type, len(kept), tuple(depths))


def _student_mid(work: _Work, last_down: Stage) -> tuple[str | None, list[int]]:
    topo = work.catalog.topology
    if topo.mid_type is None or "mid_block" in work.removed:
        return None, []
    attn = "mid_block.attentions.0"
    if topo.mid_type == "UNetMidBlock2D" or attn in work.removed:
        return "UNetMidBlock2D", []
    blocks = _kept_blocks(work, attn, topo.mid_depth)
    if last_down.depths is None:  # the mid depth is free when the last down stage has no attention
        if not blocks:
            raise WorkbenchError(
                f"{attn}: all transformer blocks are removed; remove {attn} itself (leaves one "
                f"ResNet) or keep one block"
            )
        return topo.mid_type, blocks
    want = last_down.depths[0]
    if len(blocks) == want:
        return topo.mid_type, blocks
    touched = len(blocks) < topo.mid_depth
    if touched or want > topo.mid_depth:
        raise WorkbenchError(
            f"{attn} keeps {len(blocks)} transformer blocks but the first attention of "
            f"{last_down.path} keeps {want}: diffusers ties the mid block's depth to it. Keep "
            f"{want} mid blocks, change that attention's depth to {len(blocks)}, or remove {attn}"
        )
    extra = [f"{attn}.transformer_blocks.{k}" for k in blocks[want:]]
    work.auto.extend(extra)
    work.notes.append(
        f"removed the last {len(extra)} transformer blocks of {attn} too: diffusers ties the mid "
        f"block's depth to the first attention of {last_down.path}, which keeps {want}"
    )
    return topo.mid_type, blocks[:want]


def _layer_map(
    work: _Work, topo: Topology, kept: list[int], mid_type: str | None, mid_blocks: list[int]
) -> dict[str, str]:
    """Student atom -> teacher atom for every inherited ResNet, attention, block and sampler."""
    n = len(topo.down)
    up_kept = [n - 1 - i for i in reversed(kept)]
    stages = [(topo.down[i], f"down_blocks.{q}") for q, i in enumerate(kept)]
    stages += [(topo.up[k], f"up_blocks.{q}") for q, k in enumerate(up_kept)]
    mapping: dict[str, str] = {}
    for stage, path in stages:
        mapping |= _stage_map(work, stage, path)
    # every stage but the last has a downsampler, every up stage but the last an upsampler
    for q, i in enumerate(kept[:-1]):
        mapping[f"down_blocks.{q}.downsamplers.0"] = f"down_blocks.{i}.downsamplers.0"
    for q, k in enumerate(up_kept[:-1]):
        mapping[f"up_blocks.{q}.upsamplers.0"] = f"up_blocks.{k}.upsamplers.0"
    if mid_type is not None:
        mapping["mid_block.resnets.0"] = "mid_block.resnets.0"
    if mid_type == "UNetMidBlock2DCrossAttn":
        mapping["mid_block.resnets.1"] = "mid_block.resnets.1"
        mapping["mid_block.attentions.0"] = "mid_block.attentions.0"
        for b, k in enumerate(mid_blocks):
            mapping[f"mid_block.attentions.0.transformer_blocks.{b}"] = (
                f"mid_block.attentions.0.transformer_blocks.{k}"
            )
    return mapping


def _stage_map(work: _Work, stage: Stage, path: str) -> dict[str, str]:
    """Student atom -> teacher atom within one kept stage (student stage ``path``)."""
    mapping: dict[str, str] = {}
    stage_attn = stage.depths is not None and f"{stage.path}.attentions" not in work.removed
    for q, t in enumerate(work.kept_layers[stage.path]):
        mapping[f"{path}.resnets.{q}"] = f"{stage.path}.resnets.{t}"
        if not stage_attn:
            continue
        s_attn, t_attn = f"{path}.attentions.{q}", f"{stage.path}.attentions.{t}"
        mapping[s_attn] = t_attn
        for b, k in enumerate(_kept_blocks(work, t_attn, stage.depths[t])):
            mapping[f"{s_attn}.transformer_blocks.{b}"] = f"{t_attn}.transformer_blocks.{k}"
    return mapping


# --------------------------------------------------------------------------- build


def student_spec(teacher_config: dict[str, Any], plan: PruningPlan) -> StudentSpec:
    return compile_plan(build_catalog(teacher_config), plan)


def build_student(teacher, plan: PruningPlan):
    """A new ``UNet2DConditionModel`` initialised from ``teacher``'s kept layers.

    Returns (student, spec). The student is on the teacher's device and dtype, and
    shares no storage with it.
    """
    spec = student_spec(dict(teacher.config), plan)
    teacher_sd = teacher.state_dict()
    student = meta_unet(spec.config)
    names = [n for n, _ in student.named_parameters()]
    for name, p in student.named_parameters():
        src = spec.teacher_name(name)
        if src not in teacher_sd or teacher_sd[src].shape != p.shape:
            raise WorkbenchError(
                f"plan {plan.name!r}: student {name} {tuple(p.shape)} cannot inherit teacher "
                f"{src}; this plan is not expressible"
            )
    state = {n: teacher_sd[spec.teacher_name(n)].detach().clone() for n in names}
    student.load_state_dict(state, strict=True, assign=True)
    # a teacher on the meta device gives a student on it (the memory estimate builds stages so)
    if teacher.device.type != "meta" and any(t.is_meta for t in (*student.parameters(), *student.buffers())):
        raise RuntimeError("student left with uninitialised tensors after loading")
    student.train(teacher.training)
    return student, spec


def save_student(student, spec: StudentSpec, out_dir: str | Path) -> Path:
    """A stock diffusers UNet folder, with the plan and layer map beside the weights."""
    out = Path(out_dir)
    student.save_pretrained(out)
    return save_plan_files(spec, out)


def save_plan_files(spec: StudentSpec, out_dir: str | Path) -> Path:
    """``plan.json`` and ``layer_map.json`` (student module -> the teacher module it inherits)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.plan.save(out / "plan.json")
    (out / "layer_map.json").write_text(
        json.dumps(
            {"student_to_teacher": spec.layer_map, "removed": list(spec.removed), "notes": list(spec.notes)},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return out


def stage_models(original, specs: list[StudentSpec], k: int, previous, stage_teacher: str,
                 feature_mode: str):  # fmt: skip
    """(student, teacher, feature pairs) of stage ``k`` of a progressive run.

    Stage 1's student is built from ``original``; a later one from ``previous`` (the stage
    before's trained student), taught by ``original`` or, with ``stage_teacher="previous"``,
    by ``previous`` (then the pairs name ``previous``'s modules).
    """
    spec = specs[k]
    if k == 0:
        student, _ = build_student(original, spec.plan)
        return student, original, spec.feature_pairs(feature_mode)
    step_plan = derive_stage_plan(specs[k - 1], spec, name=f"stage-{k + 1}")
    student, step_spec = build_student(previous, step_plan)
    if stage_teacher == "previous":
        return student, previous, step_spec.feature_pairs(feature_mode)
    return student, original, spec.feature_pairs(feature_mode)


def derive_stage_plan(prev: StudentSpec, nxt: StudentSpec, name: str) -> PruningPlan:
    """The plan over ``prev``'s student that yields ``nxt``'s (both compiled on one teacher).

    Progressive distillation removes units in stages; each stage's plan is written over
    the original teacher (so presets apply) and must remove a superset of the previous.
    """
    kept_before = set(prev.layer_map.values())
    revived = sorted(set(nxt.layer_map.values()) - kept_before, key=natural_key)
    if revived:
        raise WorkbenchError(
            f"stage {nxt.plan.name!r} keeps {', '.join(revived[:3])}, which the earlier stage "
            f"{prev.plan.name!r} removed; each stage must remove everything the one before it did"
        )
    catalog = build_catalog(prev.config)
    gone = {s for s, t in prev.layer_map.items() if t in nxt.removed_atoms}
    removed = [u.id for u in catalog.units if u.atoms <= gone]
    plan = PruningPlan(name=name, topology=catalog.topology.signature(), removed=tuple(removed))
    step = compile_plan(catalog, plan)
    composed = {s: prev.layer_map[p] for s, p in step.layer_map.items()}
    if composed != nxt.layer_map or step.student_params != nxt.student_params:
        raise WorkbenchError(
            f"stage {nxt.plan.name!r} cannot be reached from {prev.plan.name!r} by removing units: "
            "their layers inherit from different teacher layers; make the later stage remove a "
            "superset of the earlier one's units"
        )
    return plan


# LCM's guidance (w) embedding width: what latent-consistency/lcm-sdxl uses.
GUIDANCE_EMBED_DIM = 256


def with_guidance_embedding(unet, dim: int = GUIDANCE_EMBED_DIM):
    """``unet`` with LCM's w-conditioning: a stock ``UNet2DConditionModel`` whose config gains
    ``time_cond_proj_dim`` (its time embedding a bias-free ``cond_proj``: dim -> time channels),
    zero-initialised so the output is the unchanged UNet's until it trains. A UNet that has it
    already is returned as it is. Its parameters are the plan's plus ``cond_proj``'s."""
    import torch

    if unet.config.get("time_cond_proj_dim") is not None:
        return unet
    out = meta_unet(dict(unet.config) | {"time_cond_proj_dim": dim})
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    weight = out.time_embedding.cond_proj.weight
    state["time_embedding.cond_proj.weight"] = torch.zeros(weight.shape, dtype=unet.dtype, device=unet.device)
    out.load_state_dict(state, strict=True, assign=True)
    return out.train(unet.training)
