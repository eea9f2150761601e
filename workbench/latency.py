"""Latency of a teacher per catalog atom, instant student estimates, and measured speedups.

*Profile*: after warm-up, a few instrumented forwards of the teacher time every atom
(ResNet, attention shell, transformer block) with hooks: ``perf_counter`` on CPU (kernels
run synchronously there), CUDA events on GPU (read after one synchronise, so the hooks
never stall the stream). Nested modules are not double-counted: an attention shell's time
is its module's time minus its transformer blocks', and ``rest`` is the whole forward
minus every atom. Per-atom medians over the passes denoise a shared machine (scaled so the
parts add up to the whole's median). Profiles are cached as JSON per (model identity,
device, dtype, resolution, batch). A model folder may ship profiles measured before it was
published (``<folder>/latency/cpu-fp32-64px-b1.json``; the toy does): read when this machine
has none, so its deltas show before anyone profiles, and said to come from elsewhere.

*Estimate*: a student keeps the teacher's remaining atoms with unchanged shapes, so its
latency is the teacher's minus the removed atoms' times; a dict sum, microseconds.

*Measure*: build the real student and time it interleaved with the teacher in one run,
so both see the same machine load.

Weightless bases (``sdxl-base``) are timed with random weights: latency does not depend
on weight values, as long as activations stay finite and denormals are flushed (set here
on CPU: random weights would otherwise hit slow denormal paths).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workbench import cache
from workbench.catalog import REST, build_catalog, meta_unet
from workbench.cost import atom_flops, dummy_inputs, latent_size, level_shifts
from workbench.cost import student_flops as student_flops_of
from workbench.dtypes import NAMES, fast_dtype, torch_dtype
from workbench.errors import WorkbenchError
from workbench.models import Base, load_unet, resolve_base
from workbench.plan import PruningPlan
from workbench.presets import load_preset
from workbench.progress import Progress, report, scaled
from workbench.surgery import StudentSpec, build_student, compile_plan

SCHEMA = 2  # bump when the profile JSON or the way it is measured changes (2: samplers are atoms)
DTYPES = NAMES  # the dtypes a latency is measured in
CPU_RESOLUTION = 512  # default on CPU: SDXL at 1024 px takes ~4x longer per pass
# Instrumented passes whose medians make the profile, after warm-up passes. One CPU warm-up
# is enough (oneDNN builds its kernels and reorders weights on the first call); a GPU
# needs a few (cuDNN autotuning, allocator growth) and its passes are cheap.
PASSES = {"cpu": 3, "cuda": 10}
WARMUP = {"cpu": 1, "cuda": 3}


# --------------------------------------------------------------------------- options


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, and available here."""
    import torch

    device = (device or "cpu").strip().lower()
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise WorkbenchError(f"unknown device {device!r}; use cpu or cuda (cuda:N for another GPU)")
    if not torch.cuda.is_available():
        raise WorkbenchError(
            f"device {device!r} requested but CUDA is not available here (torch {torch.__version__} "
            f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use --device cpu"
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise WorkbenchError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def check_dtype(dtype: str, device: str):
    """The torch dtype for ``bf16``/``fp16``/``fp32`` on ``device``; refuses what would mislead.

    fp16 on CPU is refused: most CPU kernels have no fast fp16 path (on the project's
    development Xeon a 640-channel 3x3 convolution took 19 s in fp16 against 0.24 s in bf16
    and 0.06 s in fp32), so its timings say nothing about a deployment. Use bf16 or fp32 on
    CPU, and fp16 or bf16 on GPU.
    """
    import torch

    key = (dtype or "").strip().lower()
    if key not in DTYPES:
        raise WorkbenchError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if key == "fp16" and device == "cpu":
        raise WorkbenchError(
            "fp16 is not supported on CPU: most CPU kernels have no fast fp16 path (convolutions "
            "run orders of magnitude slower), so the timing would be meaningless; use bf16 or fp32 "
            "on CPU, fp16 on cuda"
        )
    if key == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise WorkbenchError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use fp16")
    return torch_dtype(key)


def default_resolution(base: Base, device: str) -> int:
    """512 px on CPU (affordable), the model's native size on GPU."""
    if device == "cpu":
        return CPU_RESOLUTION
    return int(base.unet_config.get("sample_size", 128)) * base.vae_scale_factor


def model_identity(base: Base) -> str:
    """A short hash of the base name and its UNet config (private ``_`` keys ignored)."""
    config = {k: v for k, v in base.unet_config.items() if not k.startswith("_")}
    blob = json.dumps({"base": base.name, "config": config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _device_label(device: str) -> str:
    """``cpu``, or the GPU model, so that a cache shared by different GPUs never mixes them."""
    if device == "cpu":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "model"


def profile_path(base: Base, device: str, dtype: str, resolution: int, batch: int) -> Path:
    name = (
        f"{_slug(Path(base.name).name or base.name)}-{model_identity(base)}-"
        f"{_slug(_device_label(device))}-{dtype}-{resolution}px-b{batch}.json"
    )
    return cache.path("latency", name)


@dataclass(frozen=True)
class LatencySetup:
    """Validated options of one latency question, resolved before any model is built."""

    base: Base
    device: str
    dtype: str
    torch_dtype: Any
    resolution: int
    latent: int
    batch: int


def latency_setup(
    base: str | Base,
    device: str = "cpu",
    dtype: str | None = None,
    resolution: int | None = None,
    batch: int = 1,
) -> LatencySetup:
    """Check the options (device, dtype, resolution, batch) before any model is built;
    ``dtype`` None is the device's fast dtype (``workbench.dtypes.fast_dtype``)."""
    base = resolve_base(base) if isinstance(base, str) else base
    device = check_device(device)
    dtype = fast_dtype(device).name if dtype is None else dtype
    torch_dtype = check_dtype(dtype, device)
    if not isinstance(batch, int) or batch < 1:
        raise WorkbenchError(f"batch {batch!r} must be a positive integer")
    resolution = default_resolution(base, device) if resolution is None else resolution
    latent = latent_size(base.unet_config, resolution, base.vae_scale_factor)
    return LatencySetup(base, device, dtype.strip().lower(), torch_dtype, resolution, latent, batch)


# --------------------------------------------------------------------------- models


def random_unet(config: dict[str, Any], device: str, dtype):
    """``config`` built on meta, materialised uninitialised on ``device``, then filled fast.

    Weights are uniform in +-1/sqrt(fan_in) (PyTorch's default bound), norm scales 1 and
    biases 0: activations stay O(1) through SDXL's depth, so no inf/NaN or denormal paths
    distort the timing. Filling in place in ``dtype`` never holds an fp32 copy (SDXL:
    5.1 GB in bf16).
    """
    import torch

    # nn.Module.to, not diffusers' override: that one only adds a warning about modules to
    # keep in fp32, of which a UNet has none. On meta the cast is free.
    model = torch.nn.Module.to(meta_unet(config), dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)  # GroupNorm / LayerNorm scales
            else:
                p.zero_()
        for b in model.buffers():  # none in stock UNets today; keep them defined anyway
            b.zero_()
    return model.eval()


def load_teacher(setup: LatencySetup, progress: Progress | None = None):
    """The base's UNet on the device: its weights when it has them, else random ones."""
    report(progress, 0.0, f"building {setup.base.name} UNet on {setup.device} ({setup.dtype})")
    if setup.base.has_weights:
        return load_unet(setup.base, device=setup.device, dtype=setup.torch_dtype)
    return random_unet(setup.base.unet_config, setup.device, setup.torch_dtype)


def _inputs(setup: LatencySetup, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)  # same inputs for teacher and student, run after run
    return dummy_inputs(config, setup.latent, setup.batch, setup.device, setup.torch_dtype)


# --------------------------------------------------------------------------- timing


class _Clock:
    """Marks on the device's timeline: CPU ``perf_counter``, or CUDA events read after a sync."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self._torch = torch
        self._device = torch.device(device)

    def mark(self) -> Any:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record(self._torch.cuda.current_stream(self._device))  # the model's GPU, not GPU 0
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize(self._device)

    def seconds(self, start: Any, end: Any) -> float:
        """Elapsed seconds between two marks (call ``sync`` first on GPU)."""
        if self.cuda:
            return start.elapsed_time(end) / 1e3  # elapsed_time is in ms
        return end - start


def _forward(model, inputs: dict[str, Any]) -> Any:
    return model(**inputs, return_dict=False)[0]


def time_forward(model, inputs: dict[str, Any], clock: _Clock) -> float:
    """Seconds of one synchronised forward."""
    clock.sync()  # nothing queued before the start mark
    start = clock.mark()
    _forward(model, inputs)
    end = clock.mark()
    clock.sync()
    return clock.seconds(start, end)


def instrumented_pass(model, inputs: dict[str, Any], atoms: Iterable[str], clock: _Clock):
    """One forward timing each atom exclusively: returns (whole seconds, {atom: seconds}).

    ``atoms`` are module paths from the catalog (``rest`` excluded). Each module is timed
    inclusively between a pre- and a post-hook; an attention's transformer blocks are then
    subtracted from it, and ``rest`` is the whole minus all atoms, so the parts add up to
    the whole exactly (up to float rounding).
    """
    marks: dict[str, list[Any]] = {}
    handles = []
    try:
        for name in atoms:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(_start_hook(marks, name, clock)))
            handles.append(module.register_forward_hook(_end_hook(marks, name, clock)))
        clock.sync()
        start = clock.mark()
        _forward(model, inputs)
        end = clock.mark()
        clock.sync()
    finally:
        for h in handles:
            h.remove()
    whole = clock.seconds(start, end)
    inclusive = {name: sum(clock.seconds(s, e) for s, e in pairs) for name, pairs in _pairs(marks).items()}
    return whole, _exclusive(inclusive, whole)


def _start_hook(marks: dict[str, list[Any]], name: str, clock: _Clock):
    def hook(module, args):
        marks.setdefault(name, []).append(clock.mark())

    return hook


def _end_hook(marks: dict[str, list[Any]], name: str, clock: _Clock):
    def hook(module, args, output):
        marks[name].append(clock.mark())

    return hook


def _pairs(marks: dict[str, list[Any]]) -> dict[str, list[tuple[Any, Any]]]:
    """[start, end, start, end, ...] -> [(start, end), ...]; a module may run more than once."""
    return {name: list(zip(m[0::2], m[1::2])) for name, m in marks.items()}


def _exclusive(inclusive: dict[str, float], whole: float) -> dict[str, float]:
    out = dict(inclusive)
    for name, t in inclusive.items():
        if ".transformer_blocks." in name:
            out[name.rsplit(".transformer_blocks.", 1)[0]] -= t  # the shell alone
    out[REST] = whole - sum(out.values())
    return out


def _median_spread(times: list[float]) -> tuple[float, float]:
    """Median seconds, and spread = (max - min) / median."""
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if med > 0 else 0.0


# --------------------------------------------------------------------------- profile


@dataclass
class Profile:
    """Per-atom latency of one teacher on one device, dtype, resolution and batch."""

    base: str
    identity: str
    device: str
    device_name: str
    dtype: str
    resolution: int
    batch: int
    teacher_s: float  # median whole forward, seconds
    teacher_spread: float  # (max - min) / median over the passes
    atom_s: dict[str, float]  # exclusive seconds per atom, ``rest`` included; sums to teacher_s
    parts_scale: float  # teacher_s / sum of per-atom medians (1.0 on a quiet machine)
    atom_flops: dict[str, int]  # per forward of ``batch`` images, ``rest`` included
    teacher_params: int
    passes: int
    warmup: int
    weights: str  # "loaded" or "random"
    created: str  # UTC ISO time
    load_avg: tuple[float, float, float] | None  # 1/5/15 min, when measured
    threads: int
    torch_version: str
    schema: int = SCHEMA
    path: str | None = field(default=None, compare=False)
    from_cache: bool = field(default=False, compare=False)
    shipped: bool = field(default=False, compare=False)  # measured elsewhere, shipped with the model

    def estimate(self, removed_atoms: Iterable[str]) -> float:
        """Seconds of a student without ``removed_atoms`` (e.g. ``StudentSpec.removed_atoms``)."""
        atom_s = self.atom_s
        try:
            return self.teacher_s - sum(atom_s[a] for a in removed_atoms)
        except KeyError as err:
            raise WorkbenchError(
                f"atom {err.args[0]!r} is not in the latency profile of {self.base}; the plan was "
                "compiled for another model"
            ) from None

    @property
    def teacher_flops(self) -> int:
        return sum(self.atom_flops.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"], data["from_cache"], data["shipped"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        data = dict(data)
        if data.get("load_avg") is not None:
            data["load_avg"] = tuple(data["load_avg"])
        return cls(**data)


def get_profile(
    base: str | Base,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    resolution: int | None = None,
    batch: int = 1,
    refresh: bool = False,
    progress: Progress | None = None,
) -> Profile:
    """The teacher's latency profile, from the cache or measured now (then cached).

    ``resolution`` defaults to 512 px on CPU and the model's native size on GPU.
    Measuring builds the teacher (SDXL: ~5 GB in bf16) and runs a few forwards.
    """
    setup = latency_setup(base, device, dtype, resolution, batch)
    return profile_for(setup, refresh=refresh, progress=progress)


def cached_profile(
    base: str | Base,
    device: str = "cpu",
    dtype: str | None = None,
    resolution: int | None = None,
    batch: int = 1,
) -> Profile | None:
    """The teacher's profile if one was made earlier (cached on disk), else one shipped with the
    model (``Profile.shipped``); never measures. ``None`` as well for options that cannot be
    profiled here (cuda on a CPU machine): profiling says why."""
    try:
        setup = latency_setup(base, device, dtype, resolution, batch)
    except WorkbenchError:
        return None
    path = profile_path(setup.base, setup.device, setup.dtype, setup.resolution, setup.batch)
    return _read_profile(path) or shipped_profile(setup)


def shipped_path(setup: LatencySetup) -> Path | None:
    """Where the model's folder would ship a profile for these options (None: not a folder)."""
    folder = Path(setup.base.location)
    if setup.device != "cpu" or not folder.is_dir():  # a GPU's profile is only good for that GPU
        return None
    return folder / "latency" / f"cpu-{setup.dtype}-{setup.resolution}px-b{setup.batch}.json"


def shipped_profile(setup: LatencySetup) -> Profile | None:
    """The profile shipped with the model for these options, if any (for this exact model)."""
    path = shipped_path(setup)
    profile = None if path is None else _read_profile(path)
    if profile is None or profile.identity != model_identity(setup.base):
        return None
    profile.shipped = True
    return profile


def profile_for(
    setup: LatencySetup, *, refresh: bool = False, progress: Progress | None = None, model=None
) -> Profile:
    """``get_profile`` for checked options; ``model`` reuses a teacher already built for them."""
    path = profile_path(setup.base, setup.device, setup.dtype, setup.resolution, setup.batch)
    if not refresh:
        cached = _read_profile(path)
        if cached is not None:
            report(progress, 1.0, f"latency profile from cache ({path.name})")
            return cached
    own = model is None
    if own:
        model = load_teacher(setup, scaled(progress, 0.0, 0.3))
    try:
        profile = profile_model(model, setup, progress=scaled(progress, 0.3 if own else 0.0, 1.0))
    finally:
        if own:
            del model
            free_memory(setup.device)
    _write_profile(profile, path)
    return profile


def _read_profile(path: Path) -> Profile | None:
    data = cache.read(path, SCHEMA)
    try:
        profile = None if data is None else Profile.from_dict(data)
    except (ValueError, TypeError):  # from an older layout: re-profile
        return None
    if profile is not None:
        profile.path, profile.from_cache = str(path), True
    return profile


def _write_profile(profile: Profile, path: Path) -> None:
    cache.write(path, profile.to_dict())
    profile.path = str(path)


def profile_model(model, setup: LatencySetup, *, progress: Progress | None = None) -> Profile:
    """Warm up, then time every atom over a few instrumented passes (per-atom medians)."""
    import torch

    _flush_denormals(setup.device)
    catalog = build_catalog(setup.base.unet_config)
    atoms = [a for a in catalog.atom_params if a != REST]
    kind = "cuda" if setup.device.startswith("cuda") else "cpu"
    warmup, passes = WARMUP[kind], PASSES[kind]
    clock = _Clock(setup.device)
    inputs = _inputs(setup, setup.base.unet_config)
    wholes: list[float] = []
    per_atom: dict[str, list[float]] = {a: [] for a in [*atoms, REST]}
    with torch.inference_mode():
        for i in range(warmup):
            report(progress, i / (warmup + passes), f"warm-up {i + 1}/{warmup}")
            time_forward(model, inputs, clock)
        for i in range(passes):
            report(progress, (warmup + i) / (warmup + passes), f"profiling pass {i + 1}/{passes}")
            whole, exclusive = instrumented_pass(model, inputs, atoms, clock)
            wholes.append(whole)
            for a in per_atom:
                per_atom[a].append(exclusive.get(a, 0.0))
    teacher_s, spread = _median_spread(wholes)
    raw = {a: statistics.median(ts) for a, ts in per_atom.items()}
    # Per-atom medians drop the stalls a busy machine adds (each pass stalls in other atoms),
    # the whole's median keeps its share of them: scale the parts to add up to the whole,
    # so each atom carries its proportional share and estimate(no atoms) == teacher_s.
    scale = teacher_s / sum(raw.values())
    report(progress, 1.0, f"profiled: {teacher_s:.3f} s per forward")
    return Profile(
        base=setup.base.name,
        identity=model_identity(setup.base),
        device=setup.device,
        device_name=_device_label(setup.device),
        dtype=setup.dtype,
        resolution=setup.resolution,
        batch=setup.batch,
        teacher_s=teacher_s,
        teacher_spread=spread,
        atom_s={a: t * scale for a, t in raw.items()},
        parts_scale=scale,
        atom_flops=_atom_flops(setup),
        teacher_params=catalog.total_params,
        passes=passes,
        warmup=warmup,
        weights="loaded" if setup.base.has_weights else "random",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        load_avg=_load_avg(),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
    )


def _atom_flops(setup: LatencySetup) -> dict[str, int]:
    """FLOPs per atom for ``batch`` images (counted at batch 1 on meta; linear in batch)."""
    per_image = atom_flops(
        build_catalog(setup.base.unet_config), setup.resolution, setup.base.vae_scale_factor
    )
    return {a: f * setup.batch for a, f in per_image.items()}


def free_memory(device: str) -> None:
    """Return freed models' memory now (SDXL teacher + student: ~8 GB in bf16)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _flush_denormals(device: str) -> None:
    import torch

    if device == "cpu":
        torch.set_flush_denormal(True)  # denormals take a microcode slow path on x86


def _load_avg() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


# --------------------------------------------------------------------------- estimate


def estimate_plan(profile: Profile, spec: StudentSpec) -> dict[str, Any]:
    """The student's estimated latency, params and FLOPs from a profile: no model, microseconds."""
    if spec.teacher_params != profile.teacher_params:
        raise WorkbenchError(
            f"the latency profile is for {profile.base} ({profile.teacher_params:,} params) but the "
            f"plan was compiled for a teacher of {spec.teacher_params:,}; profile that teacher"
        )
    shifts = level_shifts(spec)
    # After a whole-stage removal the inner atoms run at 2**d times the side: their time is
    # scaled by the area (4**d), a convolution's cost; attention grows faster (measure it).
    student_s = profile.estimate(spec.removed_atoms) + sum(
        profile.atom_s[t] * (4 ** shifts[s] - 1) for s, t in spec.layer_map.items() if shifts[s]
    )
    teacher_flops = profile.teacher_flops

    def per_atom_at(d: int) -> dict[str, int]:
        base = resolve_base(profile.base)
        counted = atom_flops(
            build_catalog(base.unet_config), profile.resolution * 2**d, base.vae_scale_factor
        )
        return {a: f * profile.batch for a, f in counted.items()}

    student_flops = student_flops_of(spec, profile.atom_flops, per_atom_at)
    return {
        "teacher_s": profile.teacher_s,
        "estimated_student_s": student_s,
        "estimated_speedup": profile.teacher_s / student_s,
        "teacher_params": spec.teacher_params,
        "student_params": spec.student_params,
        "params_ratio": spec.teacher_params / spec.student_params,
        "teacher_flops": teacher_flops,
        "student_flops": student_flops,
        "flops_ratio": teacher_flops / student_flops,
    }


# --------------------------------------------------------------------------- measure


def measure_speedup(
    base: str | Base,
    plan: PruningPlan | str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    resolution: int | None = None,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    progress: Progress | None = None,
    teacher=None,
) -> dict[str, Any]:
    """Build the student and time it against the teacher, interleaved in one run.

    ``plan`` is a ``PruningPlan`` or a preset name/path. ``teacher`` may pass an already
    built teacher UNet on ``device``/``dtype`` (the benchmark reuses one across presets).
    ``speedup`` is the median over rounds of teacher/student time (each round runs both
    back to back). Spreads are (max - min) / median. ``estimate_error`` compares the profile's estimate
    with the measurement at this run's teacher time (estimated speedup vs measured), so
    machine load that changed since profiling does not count as estimate error;
    ``estimate_error_abs`` compares the estimate's absolute seconds.
    """
    import torch

    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise WorkbenchError(f"repeats ({repeats!r}) must be >= 1 and warmup ({warmup!r}) >= 0")
    setup = latency_setup(base, device, dtype, resolution, batch)
    plan = load_preset(plan) if isinstance(plan, str) else plan
    spec = compile_plan(build_catalog(setup.base.unet_config), plan)  # reject a bad plan before building
    _flush_denormals(setup.device)
    own = teacher is None
    if own:
        teacher = load_teacher(setup, scaled(progress, 0.0, 0.15))
    try:
        profile = profile_for(setup, refresh=False, progress=scaled(progress, 0.15, 0.45), model=teacher)
        report(progress, 0.45, f"building student {plan.name}")
        student, _ = build_student(teacher, plan)
        with torch.inference_mode():
            t_times, s_times = _interleaved(teacher, student, setup, spec, repeats, warmup, progress)
        del student
    finally:
        if own:
            del teacher
        free_memory(setup.device)
    return _speedupreport(setup, plan, spec, profile, t_times, s_times, warmup)


def _interleaved(
    teacher, student, setup: LatencySetup, spec: StudentSpec, repeats: int, warmup: int, progress
):
    """Teacher and student alternately (ABBA order, so neither always runs second)."""
    clock = _Clock(setup.device)
    t_in, s_in = _inputs(setup, setup.base.unet_config), _inputs(setup, spec.config)
    for i in range(warmup):
        report(progress, 0.5 + 0.1 * i / max(warmup, 1), f"warm-up {i + 1}/{warmup}")
        time_forward(teacher, t_in, clock)
        time_forward(student, s_in, clock)
    t_times, s_times = [], []  # seconds per round
    for i in range(repeats):
        report(progress, 0.6 + 0.4 * i / repeats, f"timing {i + 1}/{repeats}")
        pair = [(teacher, t_in, t_times), (student, s_in, s_times)]
        for model, inputs, out in pair if i % 2 == 0 else pair[::-1]:
            out.append(time_forward(model, inputs, clock))
    report(progress, 1.0, "done")
    return t_times, s_times


def _speedupreport(
    setup: LatencySetup,
    plan: PruningPlan,
    spec: StudentSpec,
    profile: Profile,
    t_times: list[float],
    s_times: list[float],
    warmup: int,
) -> dict[str, Any]:
    teacher_s, teacher_spread = _median_spread(t_times)
    student_s, student_spread = _median_spread(s_times)
    est = estimate_plan(profile, spec)
    # Each round times both models back to back, so its ratio sees one machine load; the
    # median of round ratios stays fair when the load drifts during the run.
    ratios = [t / s for t, s in zip(t_times, s_times)]
    speedup, speedup_spread = _median_spread(ratios)
    return {
        "base": setup.base.name,
        "plan": plan.name,
        "device": setup.device,
        "device_name": profile.device_name,
        "dtype": setup.dtype,
        "resolution": setup.resolution,
        "batch": setup.batch,
        "repeats": len(t_times),  # one time per round
        "warmup": warmup,
        "teacher_s": teacher_s,
        "student_s": student_s,
        "speedup": speedup,
        "speedup_spread": speedup_spread,
        "teacher_spread": teacher_spread,
        "student_spread": student_spread,
        "teacher_times": t_times,
        "student_times": s_times,
        "flops_ratio": est["flops_ratio"],
        "teacher_flops": est["teacher_flops"],
        "student_flops": est["student_flops"],
        "teacher_params": spec.teacher_params,
        "student_params": spec.student_params,
        "profile_teacher_s": profile.teacher_s,
        "estimated_student_s": est["estimated_student_s"],
        "estimated_speedup": est["estimated_speedup"],
        "estimate_error": speedup / est["estimated_speedup"] - 1.0,
        "estimate_error_abs": est["estimated_student_s"] / student_s - 1.0,
        "weights": profile.weights,
        "load_avg": _load_avg(),
    }


# --------------------------------------------------------------------------- per image


@dataclass(frozen=True)
class Sampling:
    """How a model draws an image: ``steps`` UNet steps, each one call, or two (the conditional
    and unconditional halves) under classifier-free guidance. A w-conditioned (LCD) student
    takes the guidance scale as an embedding: one call per step."""

    steps: int
    guided: bool

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise WorkbenchError(f"steps per image must be a whole number >= 1, got {self.steps!r}")

    @property
    def calls(self) -> int:
        return self.steps * (2 if self.guided else 1)

    def describe(self) -> str:
        return f"{self.steps} steps x {2 if self.guided else 1} call{'s' if self.guided else ''}"


TEACHER_SAMPLING = Sampling(20, guided=True)
FEW_STEP_SAMPLING = Sampling(4, guided=False)  # an LCD student at 4 LCM steps


def pipeline_parts(pipe, resolution: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds of what an image costs besides the UNet: the text encoders on one
    prompt, and the VAE decoding one latent at ``resolution`` px."""
    import torch

    _flush_denormals(str(pipe.device))
    scale = pipe.vae_scale_factor
    latent = torch.zeros(1, pipe.vae.config.latent_channels, resolution // scale, resolution // scale,
                         device=pipe.device, dtype=pipe.vae.dtype)  # fmt: skip
    text, decode = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round warms up
            started = time.perf_counter()
            pipe.encode_prompt("a photo of a cat", device=pipe.device, do_classifier_free_guidance=False)
            middle = time.perf_counter()
            pipe.vae.decode(latent)
            if i:
                text.append(middle - started)
                decode.append(time.perf_counter() - middle)
    return {"text_s": statistics.median(text), "decode_s": statistics.median(decode)}


def image_latency(unet_s: float, sampling: Sampling, parts: dict[str, float] | None) -> dict[str, Any]:
    """Seconds per image: text encoders + (steps x calls) UNet calls + VAE decode (the UNet
    calls only when ``parts`` is None: a base without a pipeline)."""
    text, decode = (parts["text_s"], parts["decode_s"]) if parts else (0.0, 0.0)
    unet = sampling.calls * unet_s
    return {"steps": sampling.steps, "calls": sampling.calls, "unet_s": unet, "text_s": text,
            "decode_s": decode, "total_s": text + unet + decode}  # fmt: skip


def per_image(teacher_s: float, student_s: float, parts: dict[str, float] | None,
              teacher: Sampling = TEACHER_SAMPLING, student: Sampling = FEW_STEP_SAMPLING) -> dict[str, Any]:  # fmt: skip
    """Teacher and student per image, each at its own steps and calls per step, from their
    per-call UNet seconds (measured or estimated) and the pipeline's other parts."""
    t, s = image_latency(teacher_s, teacher, parts), image_latency(student_s, student, parts)
    return {
        "teacher": t,
        "student": s,
        "speedup": t["total_s"] / s["total_s"],
        "parts_measured": parts is not None,
    }
