"""Sensitivity: what removing each unit alone costs, measured on the teacher's own inputs.

*Calibration*: the teacher samples a fixed set of prompts and seeds; a forward hook
records the UNet's exact inputs and outputs at a few steps spread over the schedule
(classifier-free guidance included, so both the conditional and unconditional halves
count). Those recorded calls are the test set for every student.

*Deviation* of a plan: build its student from the teacher's weights and run it on the
recorded calls; the score is the relative MSE of its prediction (noise or v, whatever the
scheduler's ``prediction_type`` makes the UNet predict),
``sum |pred_student - pred_teacher|^2 / sum |pred_teacher|^2``. Removing nothing scores 0
(the student is the teacher), a student that predicts zeros scores 1.

*Fidelity drop* and *full-prompt drop* (toy only, where a checker judges images): the
teacher's fidelity (colour and shape right) and full-prompt accuracy (all five caption
attributes right) on held-out prompts, minus the student's.

A unit that diffusers cannot remove alone (an up layer needs its mirrored down layer to
go too; a mid transformer block is tied to the last down stage's depth) is scored with
the smallest companion unit that makes the removal valid, and says so (``with``). A unit
no valid plan can remove has no score, and its ``reason`` is the constraint.

Maps are cached as JSON per model and calibration settings; a cached map that lacks
fidelity gets only the missing part computed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workbench import cache, evaluation
from workbench.catalog import Catalog, build_catalog
from workbench.errors import WorkbenchError
from workbench.latency import model_identity
from workbench.models import Base, load_pipeline, resolve_base
from workbench.plan import PruningPlan
from workbench.progress import Progress, report, scaled
from workbench.surgery import StudentSpec, build_student, compile_plan
from workbench.toy import world

# workbench.sampling is imported where images are drawn, not here: it loads diffusers' pipelines
# and transformers (seconds), which importing this module (distill_config, the CLI) must not.

SCHEMA = 3  # bump when the map's JSON or the way it is measured changes (3: whole-stage units)

# Bases without a checker calibrate on varied prompts; any will do, as long as they are fixed.
GENERIC_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a lighthouse on a cliff at sunset, oil painting",
    "a close-up portrait of an old fisherman, 85mm",
    "an isometric illustration of a tiny city block",
    "a bowl of ramen with steam rising, food photography",
    "a snowy mountain village at night with warm windows",
    "a watercolor of a fox sleeping under a tree",
    "a futuristic car parked in a neon-lit alley",
)


@dataclass(frozen=True)
class Calibration:
    """How a sensitivity map is measured; every field is part of the cache key."""

    prompts: int = 8  # calibration prompts (toy: training captions; else GENERIC_PROMPTS)
    steps: int = 20  # steps of the teacher's calibration sampling
    timesteps: int = 4  # recorded UNet calls, spread evenly over those steps
    guidance: float | None = None  # None: the base's own (toy 2, others 5)
    seed: int = 0
    fidelity_prompts: int = 8  # toy only: held-out prompts (one seed each) for the fidelity drops
    fidelity_steps: int = 20

    def check(self) -> Calibration:
        for name in ("prompts", "steps", "timesteps", "fidelity_prompts", "fidelity_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise WorkbenchError(f"sensitivity {name} must be a positive integer, got {value!r}")
        if self.timesteps > self.steps:
            raise WorkbenchError(
                f"sensitivity timesteps ({self.timesteps}) cannot exceed the sampling steps ({self.steps})"
            )
        if self.prompts > len(GENERIC_PROMPTS) * 4:
            raise WorkbenchError(f"sensitivity prompts must be at most {len(GENERIC_PROMPTS) * 4}")
        if self.guidance is not None and self.guidance < 0:
            raise WorkbenchError(f"sensitivity guidance must be >= 0, got {self.guidance}")
        return self

    def calibration_key(self) -> dict[str, Any]:
        d = asdict(self)
        del d["fidelity_prompts"], d["fidelity_steps"]
        return d


@dataclass
class UnitScore:
    """The cost of removing one unit (with its companion, where diffusers needs one)."""

    unit: str
    kind: str
    stage: str
    params: int  # the unit's own parameters
    removed_params: int  # what the measured plan removes (companion and auto-removals included)
    companion: str | None = None  # the unit removed with it, when it cannot go alone
    removed: tuple[str, ...] = ()  # every unit the measured plan removes
    deviation: float | None = None  # relative MSE of the noise prediction
    fidelity: float | None = None  # toy: the student's prompt fidelity (colour and shape right)
    full: float | None = None  # toy: the student's full-prompt accuracy (every attribute right)
    reason: str | None = None  # why no plan can remove it (then there are no scores)

    @property
    def scored(self) -> bool:
        return self.deviation is not None


@dataclass
class SensitivityMap:
    """Per-unit removal costs of one teacher, with the settings that measured them."""

    base: str
    identity: str
    settings: dict[str, Any]
    teacher_params: int
    units: dict[str, UnitScore]
    teacher_fidelity: float | None = None
    teacher_full: float | None = None
    baseline_deviation: float = 0.0  # the empty plan's deviation: 0 unless the method is broken
    samples: int = 0  # recorded UNet inputs per evaluation (calls x batch)
    seconds: float = 0.0
    created: str = ""
    device: str = "cpu"
    schema: int = SCHEMA
    path: str | None = field(default=None, compare=False)
    from_cache: bool = field(default=False, compare=False)

    def deviation(self, unit: str) -> float | None:
        return self.units[unit].deviation

    def fidelity_drop(self, unit: str) -> float | None:
        score = self.units[unit]
        if score.fidelity is None or self.teacher_fidelity is None:
            return None
        return self.teacher_fidelity - score.fidelity

    def full_drop(self, unit: str) -> float | None:
        score = self.units[unit]
        if score.full is None or self.teacher_full is None:
            return None
        return self.teacher_full - score.full

    @property
    def has_fidelity(self) -> bool:
        """Whether the checker's scores (fidelity and full-prompt accuracy) are all there."""
        return (
            self.teacher_fidelity is not None
            and self.teacher_full is not None
            and all(u.fidelity is not None and u.full is not None for u in self.units.values() if u.scored)
        )

    def ranked(self) -> list[UnitScore]:
        """Scored units, least harmful first."""
        return sorted((u for u in self.units.values() if u.scored), key=lambda u: u.deviation)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"], data["from_cache"]
        data["units"] = {
            k: {
                **asdict(v),
                "removed": list(v.removed),
                "fidelity_drop": self.fidelity_drop(k),
                "full_drop": self.full_drop(k),
            }
            for k, v in self.units.items()
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityMap:
        data = dict(data)
        units = {}
        for k, v in data.pop("units").items():
            v = {f: x for f, x in v.items() if f not in ("fidelity_drop", "full_drop")}
            units[k] = UnitScore(**{**v, "removed": tuple(v.get("removed", ()))})
        return cls(**data, units=units)


# --------------------------------------------------------------------------- probe


def calibration_prompts(base: Base, n: int) -> list[str]:
    """Fixed calibration prompts: toy training captions (never the held-out ones), else generic."""
    if base.kind == "toy":
        scenes = world.train_scenes()
        step = max(1, len(scenes) // n)
        return [scenes[(i * step) % len(scenes)].caption for i in range(n)]
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]


def recorded_steps(steps: int, timesteps: int) -> list[int]:
    """``timesteps`` step indices spread evenly over ``steps`` (first and last included)."""
    if timesteps == 1:
        return [steps // 2]
    return sorted({round(i * (steps - 1) / (timesteps - 1)) for i in range(timesteps)})


class Probe:
    """A loaded teacher with its recorded calibration calls; scores any plan on them.

    ``deviation(removed)`` builds the student of a plan (a list of unit ids) and returns
    its relative MSE; results are memoised per compiled student.
    """

    def __init__(
        self,
        base: Base | str,
        settings: Calibration = Calibration(),
        *,
        device: str = "cpu",
        pipe=None,
        progress: Progress | None = None,
    ) -> None:
        import torch

        self.base = resolve_base(base) if isinstance(base, str) else base
        self.settings = settings.check()
        self.guidance = settings.guidance if settings.guidance is not None else self.base.guidance
        if not self.base.has_pipeline:
            raise WorkbenchError(
                f"base {self.base.name!r} has no pipeline with trained weights (text encoders, VAE): "
                "sensitivity runs the teacher on real prompts; give a pipeline folder or hub id"
            )
        self.device = device
        self.catalog: Catalog = build_catalog(self.base.unet_config)
        if pipe is None:
            report(progress, 0.0, f"loading {self.base.name}")
            # fp16 on a GPU (SDXL's usual inference precision; by arithmetic, not measured:
            # 2 x 5.1 GB of UNet weights plus the text encoders), fp32 on the CPU, where fp16
            # kernels are slow. Errors are summed in fp32 either way.
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            pipe = load_pipeline(self.base, device=device, dtype=dtype)
        self.pipe = pipe
        self.teacher = pipe.unet
        self._memo: dict[frozenset[str], float] = {}
        report(progress, 0.5, "recording the teacher's calibration calls")
        with torch.no_grad():
            self.calls = self._record()
        self.samples = sum(int(c[0][0].shape[0]) for c in self.calls)
        report(progress, 1.0, f"recorded {len(self.calls)} calls ({self.samples} samples)")

    def _record(self) -> list[tuple[tuple, dict, Any]]:
        from workbench.sampling import generate  # heavy: see the note on the imports

        s = self.settings
        prompts = calibration_prompts(self.base, s.prompts)
        seeds = [s.seed + i for i in range(len(prompts))]
        wanted = set(recorded_steps(s.steps, s.timesteps))
        calls: list[tuple[tuple, dict, Any]] = []
        counter = [0]

        def hook(module, args, kwargs, output):
            if counter[0] in wanted:
                out = output[0] if isinstance(output, (tuple, list)) else output.sample
                calls.append((_detach(args), _detach(kwargs), out.detach().clone()))
            counter[0] += 1

        handle = self.teacher.register_forward_hook(hook, with_kwargs=True)
        try:
            generate(
                self.pipe, prompts, seeds, steps=s.steps, guidance=self.guidance, batch_size=len(prompts)
            )
        finally:
            handle.remove()
        if len(calls) != len(wanted):
            raise RuntimeError(f"recorded {len(calls)} UNet calls, expected {len(wanted)}")
        return calls

    def spec(self, removed: Iterable[str], name: str = "probe") -> StudentSpec:
        plan = PruningPlan(name=name, topology=self.catalog.topology.signature(), removed=tuple(removed))
        return compile_plan(self.catalog, plan)

    def deviation(self, removed: Iterable[str]) -> float:
        """Relative MSE of the student of ``removed`` on the calibration calls."""
        spec = self.spec(removed)
        key = spec.removed_atoms
        if key not in self._memo:
            self._memo[key] = self._deviation(spec)
        return self._memo[key]

    def _deviation(self, spec: StudentSpec) -> float:
        import torch

        student = self.student(spec)  # the empty plan too: checks that the copy is the teacher
        err = ref = 0.0
        with torch.no_grad():
            for args, kwargs, target in self.calls:
                out = student(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out.sample
                err += float((out.float() - target.float()).pow(2).sum())
                ref += float(target.float().pow(2).sum())
        del student
        return err / ref if ref > 0 else 0.0

    def student(self, spec: StudentSpec):
        student, _ = build_student(self.teacher, spec.plan)
        return student.eval()

    def accuracy(self, removed: Iterable[str] | None, n_prompts: int, steps: int) -> dict[str, float]:
        """Toy checker scores of the student of ``removed`` (``None``: the teacher):
        ``fidelity`` (colour and shape right) and ``full`` (every attribute right), on
        ``n_prompts`` held-out captions with one seed each."""
        from workbench.sampling import generate  # heavy: see the note on the imports

        samples = evaluation.samples(evaluation.toy_prompts(n_prompts), 1)
        prompts = [s.prompt for s in samples]
        unet = None if removed is None else self.student(self.spec(removed))
        images = generate(
            self.pipe, prompts, [s.seed for s in samples], steps=steps, guidance=self.guidance,
            unet=unet, batch_size=len(prompts),
        )  # fmt: skip
        values, _ = evaluation.judge(images, samples)
        return {"fidelity": float(values["fidelity"].mean()), "full": float(values["full"].mean())}


def _detach(value: Any) -> Any:
    """A deep copy of a forward's arguments with tensors detached and cloned."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


# --------------------------------------------------------------------------- plans per unit


def _try_spec(probe_catalog: Catalog, removed: Sequence[str]) -> StudentSpec | None:
    plan = PruningPlan(name="probe", topology=probe_catalog.topology.signature(), removed=tuple(removed))
    try:
        return compile_plan(probe_catalog, plan)
    except WorkbenchError:
        return None


def lone_plan(catalog: Catalog, unit_id: str) -> tuple[StudentSpec | None, str | None, str | None]:
    """The smallest valid plan that removes ``unit_id``: (spec, companion, reason).

    Alone if diffusers allows it; else with the one other unit that makes it valid while
    removing the fewest parameters; else ``(None, None, why)``.
    """
    plan = PruningPlan(name="probe", topology=catalog.topology.signature(), removed=(unit_id,))
    try:
        return compile_plan(catalog, plan), None, None
    except WorkbenchError as err:
        reason = str(err)
    best: tuple[int, StudentSpec, str] | None = None
    unit = catalog.unit(unit_id)
    for other in catalog.units:
        if other.id == unit_id or unit.atoms <= other.atoms:
            continue  # a unit containing this one would measure something else
        spec = _try_spec(catalog, (unit_id, other.id))
        if spec is not None and (best is None or spec.student_params > best[0]):
            best = (spec.student_params, spec, other.id)
    if best is None:
        return None, None, f"{reason} (and removing any one other unit with it does not make it valid)"
    return best[1], best[2], None


# --------------------------------------------------------------------------- map


def weights_fingerprint(base: Base) -> str:
    """Name, config and (for local folders) the UNet weight files' sizes and times."""

    stamp: list[Any] = [model_identity(base)]
    if base.kind in ("toy", "pipeline", "unet"):
        folder = Path(base.location) / ("unet" if base.kind != "unet" else "")
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            st = f.stat()
            stamp.append([f.name, st.st_size, int(st.st_mtime)])
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def map_path(base: Base, settings: Calibration, device: str) -> Path:
    key = json.dumps(
        {
            "id": weights_fingerprint(base),
            "cal": settings.calibration_key(),
            "device": device,
            "schema": SCHEMA,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() else "-" for c in Path(base.name).name.lower())[:40] or "model"
    return cache.path("sensitivity", f"{stem}-{digest}.json")


def read_map(path: Path) -> SensitivityMap | None:
    data = cache.read(path, SCHEMA)
    try:
        smap = None if data is None else SensitivityMap.from_dict(data)
    except (ValueError, TypeError, KeyError):  # corrupt: measure again
        return None
    if smap is not None:
        smap.path, smap.from_cache = str(path), True
    return smap


def write_map(smap: SensitivityMap, path: Path) -> None:
    cache.write(path, smap.to_dict())
    smap.path = str(path)


def cached_map(
    base: Base | str, settings: Calibration = Calibration(), device: str = "cpu"
) -> SensitivityMap | None:
    """The cached map for these settings, or ``None``; never measures."""
    base = resolve_base(base) if isinstance(base, str) else base
    return read_map(map_path(base, settings.check(), device))


def sensitivity(
    base: Base | str,
    settings: Calibration = Calibration(),
    *,
    fidelity: bool | None = None,
    device: str = "cpu",
    refresh: bool = False,
    progress: Progress | None = None,
    probe: Probe | None = None,
) -> SensitivityMap:
    """The sensitivity map of ``base``: from the cache, or measured now (then cached).

    ``fidelity`` (default: on for the toy, which has a checker) adds the fidelity and
    full-prompt drops.
    """
    base = resolve_base(base) if isinstance(base, str) else base
    settings = settings.check()
    if fidelity is None:
        fidelity = base.kind == "toy"
    if fidelity and base.kind != "toy":
        raise WorkbenchError(
            f"fidelity needs the toy's prompt checker; base {base.name!r} has none (drop the fidelity option)"
        )
    path = map_path(base, settings, device)
    smap = None if refresh else read_map(path)
    if smap is not None and (smap.has_fidelity or not fidelity):
        report(progress, 1.0, f"sensitivity map from cache ({path.name})")
        return smap
    started = time.perf_counter()
    if probe is None:
        probe = Probe(base, settings, device=device, progress=scaled(progress, 0.0, 0.05))
    if smap is None:
        smap = _measure_deviations(probe, scaled(progress, 0.05, 0.3 if fidelity else 1.0))
    if fidelity:
        _measure_fidelity(probe, smap, scaled(progress, 0.3, 1.0))
    smap.seconds += time.perf_counter() - started
    smap.from_cache = False
    write_map(smap, path)
    return smap


def _measure_deviations(probe: Probe, progress: Progress | None) -> SensitivityMap:
    catalog = probe.catalog
    units: dict[str, UnitScore] = {}
    total = len(catalog.units)
    for i, unit in enumerate(catalog.units):
        report(progress, i / total, f"deviation {i + 1}/{total}: {unit.id}")
        spec, companion, reason = lone_plan(catalog, unit.id)
        score = UnitScore(unit.id, unit.kind, unit.stage, unit.params, 0, companion=companion, reason=reason)
        if spec is not None:
            score.removed = spec.removed
            score.removed_params = spec.teacher_params - spec.student_params
            score.deviation = probe.deviation(spec.removed)
        units[unit.id] = score
    report(progress, 1.0, f"scored {sum(u.scored for u in units.values())} of {total} units")
    return SensitivityMap(
        base=probe.base.name,
        identity=weights_fingerprint(probe.base),
        settings=asdict(probe.settings),
        teacher_params=catalog.total_params,
        units=units,
        baseline_deviation=probe.deviation(()),
        samples=probe.samples,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=probe.device,
    )


def _measure_fidelity(probe: Probe, smap: SensitivityMap, progress: Progress | None) -> None:
    s = probe.settings
    report(progress, 0.0, "teacher fidelity")
    teacher = probe.accuracy(None, s.fidelity_prompts, s.fidelity_steps)
    smap.teacher_fidelity, smap.teacher_full = teacher["fidelity"], teacher["full"]
    todo = [u for u in smap.units.values() if u.scored and (u.fidelity is None or u.full is None)]
    by_plan: dict[tuple[str, ...], dict[str, float]] = {}
    for i, score in enumerate(todo):
        report(progress, (i + 1) / (len(todo) + 1), f"fidelity {i + 1}/{len(todo)}: {score.unit}")
        if score.removed not in by_plan:
            by_plan[score.removed] = probe.accuracy(score.removed, s.fidelity_prompts, s.fidelity_steps)
        score.fidelity, score.full = by_plan[score.removed]["fidelity"], by_plan[score.removed]["full"]
    report(progress, 1.0, "fidelity done")


def heat_rows(smap: SensitivityMap, catalog: Catalog) -> list[dict[str, Any]]:
    """One row per unit in catalog order, for tables and heatmaps."""
    rows = []
    for unit in catalog.units:
        score = smap.units.get(unit.id)
        if score is None:
            continue
        rows.append(
            {
                "unit": unit.id,
                "kind": unit.kind,
                "stage": unit.stage,
                "params": unit.params,
                "deviation": score.deviation,
                "fidelity_drop": smap.fidelity_drop(unit.id),
                "full_drop": smap.full_drop(unit.id),
                "with": score.companion,
                "reason": score.reason,
            }
        )
    return rows
