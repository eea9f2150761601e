"""Sensitivity-guided distillation (after HierarchicalPrune): feature-loss weights and
frozen layers from the teacher's sensitivity map (``workbench.sensitivity``).

Every student module is mapped to the teacher *unit* it inherits from, always through the
original teacher's names (``StudentSpec.layer_map``), so the same rules hold for every
stage and either stage teacher:

- ``X.resnets.j`` / ``X.attentions.j`` (and anything inside, e.g. a self-attention) of a
  down/up stage: the layer unit ``X.layers.j``;
- ``mid_block.resnets.0``: the ``mid_block`` unit;
- ``mid_block.attentions.0`` (and inside) and ``mid_block.resnets.1``: the
  ``mid_block.attentions.0`` unit (it removes exactly those);
- ``block`` feature mode's stage outputs: ``down_blocks.i`` / ``up_blocks.i`` take the mean
  score of the stage's kept layer units (the stage output carries all of them), and
  ``mid_block`` the ``mid_block`` unit;
- ``self-attention`` mode's pairs sit inside an attention module, so they take its layer
  unit (as ``layer`` mode does): the pair stands for that module's output, and single
  transformer blocks' scores are small and noisy.

A unit that no plan can remove has no score and counts as the map's most sensitive one.
Feature weights clip the pairs' scores below at 1% of their maximum and divide by their
mean, so the weights average 1 and ``w_feat`` keeps its scale. Freezing picks the N most
sensitive kept layer units (ties: earliest in the forward pass first).

A run works its weights and frozen modules out once (``measure_guidance``) and keeps them in
its folder (``GUIDANCE_FILE``): a resumed run trains with exactly these, whatever the cache
holds by then.
"""

from __future__ import annotations

import re
from typing import Any

from workbench import sensitivity as sens
from workbench.catalog import atom_of, natural_key
from workbench.errors import WorkbenchError
from workbench.runs import read_json

FEATURE_WEIGHTS = ("uniform", "sensitivity")
GUIDANCE_FILE = "sensitivity.json"  # in the run folder
CLIP = 0.01  # scores below this fraction of the pairs' maximum are raised to it

_STAGE_MODULE = re.compile(r"^((?:down|up)_blocks\.\d+)\.(?:resnets|attentions)\.(\d+)(?:\.|$)")
_STAGE = re.compile(r"^(?:down|up)_blocks\.\d+$")


def unit_of(teacher_module: str) -> str | None:
    """The layer unit a teacher module (or anything inside it) belongs to; ``None`` for a
    whole stage (``down_blocks.1``) or a module outside every layer (``conv_in``)."""
    m = _STAGE_MODULE.match(teacher_module)
    if m:
        return f"{m.group(1)}.layers.{m.group(2)}"
    if teacher_module == "mid_block" or teacher_module.startswith("mid_block.resnets.0"):
        return "mid_block"
    if teacher_module.startswith(("mid_block.attentions.0", "mid_block.resnets.1")):
        return "mid_block.attentions.0"
    return None


def kept_layer_units(spec) -> list[str]:
    """The teacher's layer units the student keeps (at least one module of), forward order."""
    return sorted({unit_of(t) for t in spec.layer_map.values()} - {None}, key=_forward_key)


def _forward_key(path: str) -> tuple[int, list[Any]]:
    return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(path.split(".")[0], 3), natural_key(path))


def unit_scores(smap, units: list[str]) -> dict[str, float]:
    """Deviation per unit; unscored (or unknown) units get the map's maximum."""
    scored = [u.deviation for u in smap.units.values() if u.deviation is not None]
    if not scored:
        raise WorkbenchError(f"the sensitivity map of {smap.base!r} has no scored unit; measure it again")
    top = max(scored)
    out = {}
    for unit in units:
        score = smap.units.get(unit)
        out[unit] = score.deviation if score is not None and score.deviation is not None else top
    return out


def pair_scores(spec, pairs: list[tuple[str, str]], smap) -> dict[str, float]:
    """Score of each pair's student module (see the module docstring for the mapping)."""
    kept = kept_layer_units(spec)
    scores = unit_scores(smap, kept + ["mid_block"])
    out = {}
    for student, _ in pairs:
        if _STAGE.match(student):  # block mode: a whole stage's output
            stage = spec.teacher_stage(student)  # differs once a whole stage is gone
            members = [scores[u] for u in kept if u.startswith(stage + ".layers.")]
            out[student] = sum(members) / len(members) if members else max(scores.values())
            continue
        teacher = spec.teacher_name(student)
        unit = unit_of(teacher)
        if unit is None:
            raise WorkbenchError(f"feature module {student} ({teacher}) belongs to no layer unit")
        out[student] = scores[unit] if unit in scores else unit_scores(smap, [unit])[unit]
    return out


def normalised_weights(scores: dict[str, float]) -> dict[str, float]:
    """Clip below at ``CLIP`` x the maximum, then scale to mean 1 (order kept)."""
    if not scores:
        return {}
    top = max(scores.values())
    if top <= 0:
        return dict.fromkeys(scores, 1.0)
    clipped = {k: max(v, CLIP * top) for k, v in scores.items()}
    mean = sum(clipped.values()) / len(clipped)
    return {k: v / mean for k, v in clipped.items()}


def most_sensitive(spec, smap, n: int) -> list[str]:
    """The ``n`` most sensitive kept layer units, ties broken by forward order."""
    kept = kept_layer_units(spec)
    scores = unit_scores(smap, kept)
    ranked = sorted(range(len(kept)), key=lambda i: (-scores[kept[i]], i))
    return [kept[i] for i in sorted(ranked[:n])]


def frozen_modules(spec, units: list[str]) -> list[str]:
    """Student ResNet/attention modules inherited from ``units`` (forward order)."""
    wanted = set(units)
    modules = [
        s for s, t in spec.layer_map.items() if ".transformer_blocks." not in s and unit_of(t) in wanted
    ]
    return sorted(modules, key=_forward_key)


def freeze(student, modules: list[str]) -> int:
    """Freeze every parameter of ``modules`` (student paths); returns how many were frozen."""
    wanted = set(modules)
    count = 0
    for name, p in student.named_parameters():
        atom = atom_of(name)
        parent = atom.split(".transformer_blocks.")[0]
        if atom in wanted or parent in wanted:
            p.requires_grad_(False)
            count += p.numel()
    if modules and not count:
        raise WorkbenchError(f"none of {modules[:3]} is in the student; the run folder is inconsistent")
    return count


def stage_guidance(spec, pairs: list[tuple[str, str]], smap, mode: str, n_freeze: int) -> dict[str, Any]:
    """What a stage trains with: feature weights (by student module) and frozen modules."""
    record: dict[str, Any] = {
        "feature_weights": None,
        "scores": None,
        "frozen_units": [],
        "frozen_modules": [],
    }
    if mode == "sensitivity":
        scores = pair_scores(spec, pairs, smap)
        record["scores"] = scores
        record["feature_weights"] = normalised_weights(scores)
    if n_freeze:
        units = most_sensitive(spec, smap, n_freeze)
        unit_score = unit_scores(smap, units)
        record["frozen_units"] = [{"unit": u, "score": unit_score[u]} for u in units]
        record["frozen_modules"] = frozen_modules(spec, units)
    return record


# --------------------------------------------------------------------------- a run's guidance record


def teacher_map(base, pipe, settings, device: str, report):
    """The teacher's sensitivity map: from the cache, or measured now on the loaded ``pipe``
    (then cached). ``report``: a ``runs.Reporter``."""
    smap = sens.cached_map(base, settings, device)
    if smap is None and device != "cpu":  # `workbench sensitivity` measures on the CPU by default
        smap = sens.cached_map(base, settings, "cpu")
    if smap is not None:
        report.log(f"sensitivity map from the cache ({smap.path})")
        return smap
    report.log("measuring the teacher's sensitivity map (once per teacher and settings; then cached)")
    probe = sens.Probe(
        base, settings, device=device, pipe=pipe, progress=report.phase(0.0, 0.05, "sensitivity map")
    )
    smap = sens.sensitivity(base, settings, fidelity=False, device=device, probe=probe,
                            progress=report.phase(0.05, 1.0, "sensitivity map"))  # fmt: skip
    report.log(f"sensitivity map measured in {smap.seconds:.0f}s, cached as {smap.path}")
    report.status("running", message=None)
    return smap


def measure_guidance(config, specs, smap) -> dict[str, Any]:
    """The record a run keeps: per stage, feature weights and frozen modules (``config``: a
    ``DistillConfig``; ``specs``: its stages' student specs)."""
    stages = []
    for k, spec in enumerate(specs):
        pairs = spec.feature_pairs(config.feature_mode) if config.w_feat > 0 else []
        record = stage_guidance(spec, pairs, smap, config.feature_weights, config.freeze_sensitive)
        stages.append({"stage": k + 1, "plan": spec.plan.name, **record})
    keys = ("path", "base", "identity", "device", "settings", "created")
    return {
        "feature_weights": config.feature_weights,
        "freeze_sensitive": config.freeze_sensitive,
        "map": {key: getattr(smap, key) for key in keys},
        "stages": stages,
    }


def read_guidance(path, n_stages: int, log) -> list[dict[str, Any]]:
    """The per-stage records kept in a run folder, each logged with ``log``."""

    record = read_json(path)
    if not record or len(record.get("stages", ())) != n_stages:
        raise WorkbenchError(f"{path} does not match this run's {n_stages} stage(s); delete it")
    for stage in record["stages"]:
        for line in guidance_lines(stage):
            log(line)
    return record["stages"]


def guidance_lines(stage: dict[str, Any]) -> list[str]:
    k, lines = stage["stage"], []
    if stage["feature_weights"] is not None:
        weights = ", ".join(f"{m} {w:.3f}" for m, w in stage["feature_weights"].items())
        lines.append(f"stage {k} feature weights (sensitivity, mean 1): {weights}")
    if stage["frozen_units"]:
        units = ", ".join(f"{u['unit']} ({u['score']:.4g})" for u in stage["frozen_units"])
        lines.append(
            f"stage {k} freezes the {len(stage['frozen_units'])} most sensitive layer units: {units}"
        )
        lines.append(f"stage {k} frozen modules: {', '.join(stage['frozen_modules'])}")
    return lines


def pair_weights(stage: dict[str, Any] | None, pairs: list[tuple[str, str]], device="cpu"):
    """A stage's weight per feature pair, in the pairs' order, as a float32 tensor on ``device``
    (None: the plain sum)."""
    import torch

    weights = stage["feature_weights"] if stage else None
    if weights is None or not pairs:
        return None
    missing = [s for s, _ in pairs if s not in weights]
    if missing:
        raise WorkbenchError(f"{GUIDANCE_FILE} has no feature weight for {missing[:3]}; delete it")
    return torch.tensor([weights[s] for s, _ in pairs], dtype=torch.float32, device=device)
