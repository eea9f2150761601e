"""The one place the UI keeps models: a process-wide, thread-safe cache keyed by base name.

Sessions hold only plain data (a base name, a list of removed unit ids); every handler asks
this store for what it needs. Cheap facts (catalog, FLOPs per resolution) are computed once
and kept; weights (a pipeline or a UNet, and the last student built from it) are kept for
the ``max_loaded`` most recently used bases only, because an SDXL pipeline is ~10 GB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from workbench import cost, models, sensitivity
from workbench.catalog import Catalog, build_catalog
from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan
from workbench.progress import Progress, report
from workbench.surgery import StudentSpec, build_student, compile_plan

T = TypeVar("T")


@dataclass(frozen=True)
class Pricing:
    """FLOPs of every atom and unit of one base at one resolution (one forward, batch 1)."""

    resolution: int
    latent: int
    atom_flops: dict[str, int] = field(repr=False)
    unit_flops: dict[str, int] = field(repr=False)

    @property
    def teacher_flops(self) -> int:
        return sum(self.atom_flops.values())

    at: Any = field(default=None, repr=False, compare=False)  # d -> atom FLOPs at 2**d x resolution

    def student_flops(self, spec: StudentSpec) -> int:
        return cost.student_flops(spec, self.atom_flops, self.at)


@dataclass
class _Weights:
    """Loaded weights of one base, and the student last built from them."""

    pipeline: Any = None
    unet: Any = None
    student_key: tuple[str, ...] | None = None
    student: Any = None
    spec: StudentSpec | None = None
    probe: Any = None  # a sensitivity.Probe on this pipeline (its recorded calibration calls)


def native_resolution(base: models.Base) -> int:
    """The image side the base was trained for (SDXL: 1024 px, the toy: 64 px)."""
    return int(base.unet_config.get("sample_size", 64)) * base.vae_scale_factor


class Store:
    """Thread-safe cache of bases, catalogs, FLOPs, weights, students, probes and latency profiles.

    ``calibration`` is how sensitivity maps are measured here (the real defaults unless a
    test passes smaller ones).
    """

    def __init__(self, max_loaded: int = 1, calibration: sensitivity.Calibration | None = None) -> None:
        self.max_loaded = max_loaded
        self.calibration = calibration if calibration is not None else sensitivity.Calibration()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._memo: dict[tuple, Any] = {}
        self._weights: OrderedDict[str, _Weights] = OrderedDict()
        self._profiles: dict[tuple, Any] = {}

    def _key_lock(self, key: tuple) -> threading.Lock:
        """One lock per heavy item, so two sessions never compute or load the same thing twice."""
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    # ------------------------------------------------------------ cheap facts (no weights)

    def base(self, name: str) -> models.Base:
        return models.resolve_base(name)  # cached by models (errors are not cached)

    def catalog(self, name: str) -> Catalog:
        with self._key_lock(("catalog", name)):
            return build_catalog(self.base(name).unet_config)  # cached by catalog

    def memo(self, key: tuple, compute: Callable[[], T]) -> T:
        """A value derived from a base, computed once per key by whichever session asks first."""
        if key in self._memo:  # plain dict reads are atomic; the lock is only for computing
            return self._memo[key]
        with self._key_lock(("memo", *key)):
            if key not in self._memo:
                self._memo[key] = compute()
        return self._memo[key]

    def pricing(self, name: str, resolution: int) -> Pricing:
        """FLOPs per atom and unit at ``resolution``, computed once per (base, resolution)."""
        resolution = int(resolution)
        return self.memo(("pricing", name, resolution), lambda: self._compute_pricing(name, resolution))

    def _compute_pricing(self, name: str, resolution: int) -> Pricing:
        base, catalog = self.base(name), self.catalog(name)
        latent = cost.latent_size(base.unet_config, resolution, base.vae_scale_factor)
        per_atom = cost.atom_flops(catalog, resolution, base.vae_scale_factor)
        per_unit = {u.id: sum(per_atom.get(a, 0) for a in u.atoms) for u in catalog.units}

        def at(d: int) -> dict[str, int]:  # only after a whole-stage removal (inner atoms run finer)
            return self.memo(
                ("atom-flops", name, resolution * 2**d),
                lambda: cost.atom_flops(catalog, resolution * 2**d, base.vae_scale_factor),
            )

        return Pricing(resolution, latent, per_atom, per_unit, at)

    def spec(self, name: str, removed: list[str] | tuple[str, ...]) -> StudentSpec:
        """Compile the user's removed ids against the base (raises WorkbenchError if impossible)."""
        catalog = self.catalog(name)
        return compile_plan(catalog, PruningPlan.empty(catalog, name="workbench").with_removed(removed))

    # ------------------------------------------------------------ weights

    def is_loaded(self, name: str) -> bool:
        """Whether the base's weights are in memory."""
        with self._lock:
            entry = self._weights.get(name)
            return entry is not None and entry.unet is not None

    def _entry(self, name: str) -> _Weights:
        """The base's weights entry (created empty), marked most recently used."""
        with self._lock:
            entry = self._weights.setdefault(name, _Weights())
            self._weights.move_to_end(name)
            return entry

    def _evict(self) -> None:
        """Drop the least recently used weights beyond ``max_loaded`` (after a successful load)."""
        with self._lock:
            loaded = [n for n, e in self._weights.items() if e.unet is not None]
            for name in loaded[: max(0, len(loaded) - self.max_loaded)]:
                del self._weights[name]

    def pipeline(self, name: str, progress: Progress | None = None):
        """The base's diffusers pipeline, loaded once."""
        base = self.base(name)
        if not base.has_pipeline:
            raise WorkbenchError(no_pipeline_message(base))
        with self._key_lock(("weights", name)):
            entry = self._entry(name)
            if entry.pipeline is None:
                report(progress, 0.0, f"loading the {name} pipeline")
                entry.pipeline = _loading(base, lambda: models.load_pipeline(base))
                entry.unet = entry.pipeline.unet
                self._evict()
            return entry.pipeline

    def teacher_unet(self, name: str, progress: Progress | None = None):
        """The base's UNet with weights (from its pipeline when it has one)."""
        base = self.base(name)
        if base.has_pipeline:
            return self.pipeline(name, progress).unet
        if not base.has_weights:
            raise WorkbenchError(
                f"{name!r} is a built-in config without weights: building or exporting a student needs "
                "the teacher's weights; load the toy teacher, a local folder or a hub id"
            )
        with self._key_lock(("weights", name)):
            entry = self._entry(name)
            if entry.unet is None:
                report(progress, 0.0, f"loading the {name} UNet")
                entry.unet = _loading(base, lambda: models.load_unet(base))
                self._evict()
            return entry.unet

    def student(self, name: str, removed: list[str] | tuple[str, ...], progress: Progress | None = None):
        """(student UNet, spec) for the plan, built from the teacher's weights; the last one is kept."""
        spec = self.spec(name, removed)  # reject an impossible plan before touching weights
        teacher = self.teacher_unet(name, progress)
        key = tuple(spec.plan.removed)
        with self._key_lock(("weights", name)):
            entry = self._entry(name)
            if entry.student_key != key:
                report(progress, 0.5, "building the student from the teacher's weights")
                entry.student, entry.spec = build_student(teacher, spec.plan)
                entry.student.eval()
                entry.student_key = key
            return entry.student, entry.spec

    def probe(self, name: str, progress: Progress | None = None) -> sensitivity.Probe:
        """The base's teacher with its calibration calls recorded (``self.calibration``), kept
        with its pipeline so repeated sensitivity and auto-prune runs neither reload nor
        re-record. A base without a pipeline gets the probe's own error, before any load."""
        base = self.base(name)
        if not base.has_pipeline:
            return sensitivity.Probe(base, self.calibration)  # raises why; loads nothing
        pipe = self.pipeline(name, progress)
        with self._key_lock(("probe", name)):
            entry = self._entry(name)
            probe = entry.probe
            if probe is None or probe.settings != self.calibration or probe.pipe is not pipe:
                probe = sensitivity.Probe(base, self.calibration, pipe=pipe, progress=progress)
                entry.probe = probe
            return probe

    # ------------------------------------------------------------ latency profiles

    def profile(self, name: str, resolution: int, device: str, dtype: str) -> Any:
        """The latency profile made in this process for these settings, or None."""
        return self._profiles.get((name, int(resolution), device, dtype))

    def set_profile(self, name: str, resolution: int, device: str, dtype: str, profile: Any) -> None:
        with self._lock:
            self._profiles[(name, int(resolution), device, dtype)] = profile


def no_pipeline_message(base: models.Base) -> str:
    if base.kind == "builtin":
        return (
            f"{base.name!r} is a built-in config without weights: sampling needs weights. Load the "
            "toy teacher, a local diffusers pipeline folder or a hub id in the model box"
        )
    return (
        f"{base.name!r} is a UNet folder without text encoders or VAE: sampling needs a full pipeline "
        "folder (model_index.json) or a hub id"
    )


def _loading(base: models.Base, load: Callable[[], Any]) -> Any:
    """Run a diffusers load, turning its many error types into one clear message."""
    try:
        return load()
    except WorkbenchError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise WorkbenchError(
            f"could not load the weights of {base.name!r} from {base.location}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


_STORE: Store | None = None
_STORE_LOCK = threading.Lock()


def get_store() -> Store:
    """The process-wide store (created on first use, never at import)."""
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = Store()
        return _STORE
