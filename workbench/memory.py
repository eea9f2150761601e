"""Will it fit? The peak GPU memory of a distillation run, computed without allocating.

The estimate builds each stage with the recipe's own assembly (``workbench.stage``: the
student from its teacher, the teacher in its dtype, LCM's w-embedding, adapters, the EMA
target network, what trains, gradient checkpointing) on the meta device, gives the models
fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``), and takes the recipe's own
step (``stage.train_step``: teacher forward with the feature hooks, student forward and
backward, the stage objective, gradient clipping, optimizer step): every op computes shapes
and dtypes, no memory is touched, so SDXL at 1024 px is estimated on a laptop CPU. Nothing
is loaded. A tracker (``memory_tracker``) counts every tensor storage by category; the
categories of the peak add up to its total. What would fit, and the report, are in
``memory_advice``.

An ``lcd`` stage (latent consistency distillation, ``losses.OBJECTIVES["lcd"]``) runs its
own step: the guided teacher over the doubled batch (prompt and empty prompt) and the EMA
target network, both without gradients, then the student (with the guidance embedding, or
LCM-LoRA adapters on its frozen weights) with them, and the target network's EMA update.

With ``--teacher-targets precompute`` the teacher runs first, over every micro-batch of the
stage (phase ``precompute``: student weights and teacher resident, no optimizer states yet),
and then leaves the device: a student step holds no teacher weights, only the teacher
targets read back from disk (``activations``); the bytes they take on disk per step are
reported.

The step is run once per stage; the peak is the steady state of a long run: optimizer
states created by the first step are counted in every phase before it too (a later step's
forward and backward run with them resident). ``device`` (``cuda`` or ``cpu``) says whose
memory rules apply (``memory_tracker``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from workbench import losses, memory_advice, memory_phases, optim, stage
from workbench.catalog import meta_unet
from workbench.cost import MAX_RESOLUTION
from workbench.distill_config import (
    OPTIMIZERS,
    PRECISIONS,
    STAGE_TEACHERS,
    TEACHER_DTYPES,
    TEACHER_TARGETS,
    check_lcd_combination,
    check_objectives,
    check_plans,
)
from workbench.errors import WorkbenchError
from workbench.memory_tracker import (
    CATEGORIES,  # noqa: F401  (the UI reads the categories here, beside the estimate)
    DEVICES,
    GIB,
    Tracker,
    autocast,
    checkpoint,
    fake_module,
    gib,  # noqa: F401  (the UI formats with it, beside the estimate)
    optimizer_of,
    state_bytes,
    steady_peak,
    storage_bytes,
)
from workbench.models import resolve_base
from workbench.surgery import FEATURE_MODES
from workbench.targets import TargetStore

GPU_SIZES_GB = (16, 24, 40, 48, 80)
# What a CUDA process holds beside its tensors: the context, cuBLAS/cuDNN workspaces (about
# 0.5-1 GiB), and the caching allocator's rounding and fragmentation (reserved memory is
# typically 5-15% above allocated). A verdict of "fits" keeps this margin free.
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.10
# What a CPU process holds beside its tensors: the runtime (Python, torch, diffusers and
# transformers imported: 0.48 GiB measured, benchmarks/sdxl_cpu.py) and the allocator's and
# oneDNN's scratch (3% above the tensors at the peak of an SDXL-size run there).
CPU_RUNTIME_BYTES = GIB // 2
CPU_SCRATCH = 0.05
# Parameters of the pipeline parts a built-in config has no files for (public model facts).
_BUILTIN_ENCODERS = {
    "sdxl-base": {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
    "sd15-base": {"text_encoder": 123_060_480, "vae": 83_653_863},
}


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class StagePeak:
    """The peak of one stage's training step."""

    stage: int
    plan: str
    total: int  # bytes; the sum of ``categories``
    categories: dict[str, int]
    phase: str  # where in the step the peak falls
    resident: dict[str, int]  # what stays between steps: weights, teacher, optimizer states, encoders
    student_params: int
    trainable_params: int
    teacher_params: int
    teacher_targets_disk_bytes: int = 0  # per optimizer step and process (--teacher-targets precompute)
    kind: str = "kd"  # what the stage optimises (losses.OBJECTIVES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device memory of a run: the largest stage peak, by category, with its verdicts."""

    device: str  # whose memory rules: cuda or cpu (memory_tracker.DEVICES)
    stages: tuple[StagePeak, ...]
    settings: dict[str, Any]
    notes: tuple[str, ...]
    seconds: float
    phases: tuple[memory_phases.Phase, ...] = ()  # the run outside a step (memory_phases)

    @property
    def peak(self) -> StagePeak:
        """The largest stage step."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def highest(self) -> StagePeak | memory_phases.Phase:
        """Where the whole run peaks: the largest step, or a phase outside the steps above it."""
        phase = max(self.phases, key=lambda p: p.total, default=None)
        return phase if phase is not None and phase.total > self.peak.total else self.peak

    @property
    def total(self) -> int:
        return self.highest.total

    @property
    def categories(self) -> dict[str, int]:
        return self.highest.categories

    @property
    def where(self) -> str:
        """The peak's place in words: a stage's step phase or a phase of the run."""
        top = self.highest
        return top.name if isinstance(top, memory_phases.Phase) else f"stage {top.stage}'s {top.phase}"

    def needed(self) -> int:
        """Memory to ask for: the peak plus, on a GPU, the CUDA context and allocator margin;
        on the CPU, the runtime (Python and the libraries imported) and the allocator's and
        kernels' scratch beyond the tensors counted."""
        if self.device == "cpu":
            return int(self.total * (1 + CPU_SCRATCH)) + CPU_RUNTIME_BYTES
        return int(self.total * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def verdicts(self, sizes_gb: tuple[int, ...] = GPU_SIZES_GB) -> list[dict[str, Any]]:
        """Per GPU size (GiB, as cards are sold): fits, tight (only without the margin) or no."""
        rows = []
        for gb in sizes_gb:
            capacity = gb * GIB
            if self.needed() <= capacity:
                verdict = "fits"
            elif self.total + CUDA_CONTEXT_BYTES <= capacity:
                verdict = "tight"
            else:
                verdict = "no"
            rows.append(
                {"gpu_gb": gb, "verdict": verdict, "free_gb": round((capacity - self.needed()) / GIB, 2)}
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        peak = self.peak
        return {
            "device": self.device,
            "total_bytes": self.total,
            "total_gb": round(self.total / GIB, 3),
            "needed_gb": round(self.needed() / GIB, 3),
            "categories_bytes": dict(self.categories),
            "categories_gb": {k: round(v / GIB, 3) for k, v in self.categories.items()},
            "peak_stage": peak.stage,
            "peak_phase": peak.phase,
            "peak_where": self.where,
            "step_total_gb": round(peak.total / GIB, 3),
            "stages": [s.to_dict() for s in self.stages],
            "phases": [p.to_dict() for p in self.phases],
            "verdicts": self.verdicts(),
            "settings": self.settings,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 2),
        }


# --------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class _Shapes:
    """What one micro-batch of the recipe holds, from the teacher's configs."""

    latent_channels: int
    latent_size: int
    text_len: int
    text_dim: int
    pooled_dim: int | None  # SDXL's pooled text embedding; None without added conditioning


def _shapes(base, resolution: int) -> _Shapes:
    config = base.unet_config
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return _Shapes(
        latent_channels=config.get("in_channels", 4),
        latent_size=resolution // base.vae_scale_factor,
        text_len=_text_len(base),
        text_dim=config["cross_attention_dim"],
        pooled_dim=pooled,
    )


def _text_len(base) -> int:
    """The tokenizer's length (77 for SDXL; the toy's is shorter)."""
    path = Path(base.location) / "tokenizer" / "tokenizer_config.json"
    if base.kind in ("toy", "pipeline") and path.exists():
        return int(json.loads(path.read_text(encoding="utf-8")).get("model_max_length", 77))
    return 77


def _batch(shapes: _Shapes, batch_size: int, consistency: bool = False) -> dict[str, Any]:
    """A micro-batch as ``data.Batches`` returns it (fp32 inputs, int64 timesteps); with
    ``consistency``, also the inputs of consistency distillation."""
    b, c, s = batch_size, shapes.latent_channels, shapes.latent_size
    inputs: dict[str, Any] = {
        "sample": torch.randn(b, c, s, s),
        "timestep": torch.randint(0, 1000, (b,)),
        **_text(shapes, b, drop=False),
    }
    batch = {"inputs": inputs, "target": torch.randn(b, c, s, s)}  # the task loss's target (data.Batches)
    if consistency:
        batch["consistency"] = {"latents": torch.randn(b, c, s, s), "noise": torch.randn(b, c, s, s),
                                "u": torch.rand(b), "cond": _text(shapes, b, drop=False),
                                "uncond": _text(shapes, b, drop=True)}  # fmt: skip
    return batch


def _text(shapes: _Shapes, b: int, drop: bool) -> dict[str, Any]:
    """Text inputs of ``b`` examples; the empty prompt's are one example expanded (a view)."""

    def rows(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).expand(b, *shape) if drop else torch.randn(b, *shape)

    out: dict[str, Any] = {"encoder_hidden_states": rows(shapes.text_len, shapes.text_dim)}
    if shapes.pooled_dim is not None:
        out["added_cond_kwargs"] = {"text_embeds": rows(shapes.pooled_dim), "time_ids": torch.randn(b, 6)}
    return out


def encoder_bytes(base) -> tuple[int, str | None]:
    """Bytes of the text encoders and VAE the recipe keeps on the device (fp32), and a note
    when they are unknown."""
    if base.kind in ("toy", "pipeline"):
        total = 0
        for part in ("text_encoder", "text_encoder_2", "vae"):
            for path in sorted((Path(base.location) / part).glob("*.safetensors")):
                total += 4 * _safetensors_numel(path)
        return total, None
    counts = _BUILTIN_ENCODERS.get(base.name)
    if counts is not None:
        return 4 * sum(counts.values()), None
    return 0, f"the text encoders and VAE of {base.name!r} are not counted (no local files to size them)"


def _safetensors_numel(path: Path) -> int:
    """Elements in a safetensors file, from its header (nothing loaded)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


# --------------------------------------------------------------------------- the stage and its step


def _unet(config: dict[str, Any], device: torch.device):
    """The UNet of ``config`` in fp32 (as a pipeline loads it): on the meta device (no memory,
    no init), or real on the CPU (random weights: for measuring the estimate)."""
    from diffusers import UNet2DConditionModel  # lazy, as everywhere in the core

    if device.type == "meta":
        return meta_unet(config)
    return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@dataclass(frozen=True)
class _Models:
    """One stage's models, as the recipe's ``Distillation.stage`` makes them."""

    stage: stage.StageModels
    ema_target: Any  # an lcd stage's EMA target network (None for kd)
    trainable: list[torch.Tensor]


def _stage_models(config, base, specs, k: int, mode) -> _Models:
    """Stage ``k``'s models by the recipe's own assembly (``workbench.stage``), built on the
    meta device and given fake tensors of ``mode``; with ``mode`` None, real ones (random
    weights, on the CPU). Stage ``k``'s starting student (the stage before's) is a stock UNet
    of its plan, as the recipe loads it."""
    device = torch.device("meta" if mode is not None else "cpu")
    original = _unet(base.unet_config, device)
    previous = _unet(specs[k - 1].config, device) if k else None
    models = stage.stage_models(config, specs, k, original, previous, device)
    stage.add_adapters(config, specs, k, models, log=lambda _message: None)
    ema_target = stage.ema_target(models.student) if models.kind == "lcd" else None
    if mode is not None:
        for module in (models.student, models.teacher, ema_target):
            if module is not None:
                fake_module(module, mode)
    # freeze_sensitive is not applied (a note says so): every layer trains, an upper bound
    trainable = stage.trainable(config, models.student.train(), [], checkpoint=checkpoint)
    return _Models(models, ema_target, trainable)


class _Accelerator:
    """What ``stage.train_step`` asks of accelerate, for one process on ``device``'s rules; it
    also tells the tracker where in the step it is."""

    num_processes = 1

    def __init__(self, config, device: str, tracker: Tracker) -> None:
        self.config, self.device, self.tracker = config, device, tracker

    def no_sync(self, _model):
        return contextlib.nullcontext()

    def autocast(self):
        return autocast(self.config.mixed_precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.tracker.enter("backward")
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float):
        self.tracker.enter("optimizer step", "optimizer")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.device == "cuda")


def _objective_setup(config, models: _Models, schedule: tuple[list[float], str] | None = None):
    """The stage objective's setup, by the recipe's own functions; an lcd stage's needs the
    teacher's ``_noise_schedule`` (the reward of RG-LCD is left out: a note says so)."""
    if models.stage.kind == "lcd":
        alphas, prediction = torch.tensor(schedule[0]), schedule[1]  # (T,) on the device
        return stage.lcd_setup(config, models.ema_target, alphas, prediction)
    return stage.kd_setup(config, models.stage.pairs)


def _noise_schedule(base) -> tuple[list[float], str]:
    """(alphas_cumprod (T,), prediction type) of the teacher's scheduler (a stock DDPM
    schedule where the base has no scheduler file)."""
    from diffusers import DDPMScheduler

    path = Path(base.location or ".") / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if base.location and path.exists() else {}
    schedule = DDPMScheduler.from_config(config)
    return schedule.alphas_cumprod.tolist(), schedule.config.prediction_type


@dataclass(frozen=True)
class _ReadBackTargets(TargetStore):
    """Precomputed teacher targets as a step reads them back: fresh device tensors each read."""

    held: Any = None  # losses.TeacherTargets

    def read(self, g: int, micro: int):
        pred = None if self.held.pred is None else torch.empty_like(self.held.pred)
        return losses.TeacherTargets(pred, {k: torch.empty_like(v) for k, v in self.held.features.items()})


def _precompute(config, models: _Models, shapes: _Shapes, tracker: Tracker) -> tuple[_ReadBackTargets, int]:
    """The recipe's precompute before a stage (a micro-batch stands for all): the teacher's
    forward with the student's weights resident, then teacher and its targets leave the
    device. Returns the store the step reads the teacher targets from and their bytes per
    micro-batch."""
    tracker.enter("precompute (teacher targets)")
    teacher = models.stage.teacher
    held = losses.teacher_targets(
        teacher, _batch(shapes, config.batch_size), _objective_setup(config, models)
    )
    tensors = [held.pred, *held.features.values()]
    tracker.release([*tensors, *teacher.parameters(), *teacher.buffers()])
    size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return _ReadBackTargets(Path("."), held=held), size


def _train_step(
    config,
    models: _Models,
    optimizer,
    shapes: _Shapes,
    device: str,
    tracker: Tracker,
    store: _ReadBackTargets | None = None,
    schedule=None,
) -> None:
    """The recipe's own optimizer step (``stage.train_step``), phases marked for the tracker.

    Two micro-batches stand for any gradient accumulation: from the second on, the
    gradients of the earlier ones are resident while the next runs.
    """
    config = dataclasses.replace(config, grad_accum=min(config.grad_accum, 2))
    labels, m = config.grad_accum > 1, models.stage

    def batches(_g: int, micro: int) -> dict[str, Any]:
        tracker.label = f" (micro-batch {micro + 1})" if labels else ""
        tracker.enter("batch")
        return _batch(shapes, config.batch_size, consistency=m.kind == "lcd")

    setup = _objective_setup(config, models, schedule)
    handles = [
        m.teacher.register_forward_pre_hook(lambda *_: tracker.enter("teacher forward")),
        m.student.register_forward_pre_hook(lambda *_: tracker.enter("student forward")),
        optimizer.register_step_pre_hook(lambda *_: tracker.enter("optimizer step", "optimizer")),
    ]
    if models.ema_target is not None:
        handles.append(
            models.ema_target.register_forward_pre_hook(lambda *_: tracker.enter("target forward"))
        )
    accelerator = _Accelerator(config, device, tracker)
    run = stage.Stage(
        0,
        m.kind,
        m.student,
        m.student,
        store or m.teacher,
        setup,
        optimizer,
        optim.make_schedule(optimizer, config),
        accelerator,
        0,
    )
    try:
        stage.train_step(run, batches, 0, config)
    finally:
        for handle in handles:
            handle.remove()


def _stage_peak(config, base, specs, k: int, shapes: _Shapes, device: str, fake: bool = True) -> StagePeak:
    # a shape environment lets the step read its loss terms (``.item()``) as symbols
    mode = FakeTensorMode(shape_env=ShapeEnv()) if fake else None
    models = _stage_models(config, base, specs, k, mode)
    student, teacher = models.stage.student, models.stage.teacher
    tracker = Tracker()
    precompute, disk = config.teacher_targets == "precompute", 0
    schedule = _noise_schedule(base) if models.stage.kind == "lcd" else None  # real values, before the mode
    for t in (*teacher.parameters(), *teacher.buffers()):
        tracker.claim(t, "teacher")
    for t in (*student.parameters(), *student.buffers()):
        tracker.claim(t, "weights")
    ema_tensors = [*models.ema_target.parameters(), *models.ema_target.buffers()] if models.ema_target else []
    for t in ema_tensors:
        tracker.claim(t, "ema_target")
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.claim(p.grad, "gradients"))
        for p in models.trainable
    ]
    try:
        with mode or contextlib.nullcontext():
            store = None
            if precompute:  # before the optimizer exists, as the recipe does it
                with tracker:
                    store, disk = _precompute(config, models, shapes, tracker)
            optimizer = optimizer_of(config, models.trainable, device)
            with tracker:
                _train_step(config, models, optimizer, shapes, device, tracker, store, schedule)
            states = state_bytes(optimizer)
    finally:
        for hook in hooks:
            hook.remove()
    phase, total, categories = steady_peak(tracker.peaks, states)
    spec = specs[k]
    return StagePeak(
        stage=k + 1,
        plan=spec.plan.name,
        total=total,
        categories=categories,
        phase=phase,
        resident={
            "weights": storage_bytes([*student.parameters(), *student.buffers()]),
            "teacher": 0 if precompute else storage_bytes([*teacher.parameters(), *teacher.buffers()]),
            "optimizer_states": states,
            "ema_target": storage_bytes(ema_tensors),
            "encoders": 0,  # set aside during student steps (memory_phases counts them)
        },
        student_params=spec.student_params,
        trainable_params=sum(p.numel() for p in models.trainable),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        teacher_targets_disk_bytes=disk * config.grad_accum,
        kind=models.stage.kind,
    )


# suggestions, a kd stage shared by runs that differ later): exact, since a stage's peak is a
# pure function of the key below. Most of an estimate is fake-tensor dispatch (~0.3 ms an op).
_PEAKS: OrderedDict[str, StagePeak] = OrderedDict()
_PEAKS_KEPT = 64
# Options no step reads: they change nothing a stage holds.
_NOT_IN_A_STEP = ("steps", "seed", "data", "toy_samples", "log_every", "checkpoint_every", "keep_checkpoints",
                  "sample_every", "sample_steps", "sample_prompts", "teacher_image_steps",
                  "teacher_image_guidance")  # fmt: skip


def _peak_key(config, base, k: int, device: str) -> str:
    """What stage ``k``'s peak depends on: the options, the stages up to it (its plan and
    the one it starts from) and their kinds, the teacher's UNet and files, the device's rules."""
    fields = {n: v for n, v in config.to_dict().items() if n not in _NOT_IN_A_STEP}
    fields |= {
        "stages": fields["stages"][: k + 1],
        "objectives": [config.stage_kind(i) for i in range(k + 1)],
    }
    teacher = {"name": base.name, "location": str(base.location), "unet": base.unet_config}
    return json.dumps([fields, teacher, k, device, torch.__version__], sort_keys=True, default=str)


def _cached_stage_peak(config, base, specs, k: int, shapes: _Shapes, device: str,
                       fake: bool) -> tuple[StagePeak, bool]:  # fmt: skip
    """(stage ``k``'s peak, whether it was kept from an earlier estimate)."""
    if not fake:  # the real step is the check of the fake one: always run
        return _stage_peak(config, base, specs, k, shapes, device, fake), False
    key = _peak_key(config, base, k, device)
    peak = _PEAKS.get(key)
    if peak is None:
        _PEAKS[key] = _stage_peak(config, base, specs, k, shapes, device, fake)
        while len(_PEAKS) > _PEAKS_KEPT:
            _PEAKS.popitem(last=False)
    _PEAKS.move_to_end(key)
    return _PEAKS[key], peak is not None


# --------------------------------------------------------------------------- the estimate


def resolution_of(config, base) -> int:
    """The training resolution (px) a run of ``config`` uses, checked against the UNet."""
    resolution = config.resolution
    if resolution is None:
        resolution = base.unet_config.get("sample_size", 64) * base.vae_scale_factor
    step = base.vae_scale_factor * 2 ** (len(base.unet_config["block_out_channels"]) - 1)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % step:
        raise WorkbenchError(
            f"resolution {resolution!r} px does not fit {base.name!r}'s UNet: use a positive multiple "
            f"of {step} px (the VAE's factor {base.vae_scale_factor} times the UNet's downsampling)"
        )
    if resolution > MAX_RESOLUTION:  # beyond it torch's size arithmetic overflows
        raise WorkbenchError(f"resolution {resolution} px is too large: at most {MAX_RESOLUTION} px")
    return resolution


def check_device(device: str) -> str:
    """Whose memory rules the estimate follows (the memory command's ``--target``)."""
    if device not in DEVICES:
        raise WorkbenchError(f"unknown memory target {device!r}; choose one of {', '.join(DEVICES)}")
    return device


def estimate(config, device: str = "cuda", fake: bool = True, ranks: int = 1) -> MemoryEstimate:
    """Peak memory of one process of a run of ``config`` (a ``DistillConfig``), on ``device``'s
    rules (cuda or cpu); with ``ranks`` > 1, of one of that many FSDP processes (``shard``).

    Nothing is loaded or allocated; models are built from their configs. Seconds for SDXL
    at 1024 px on a CPU, most of it running the fake step. ``fake=False`` runs the same step
    on real tensors (random weights, on the CPU) under the same tracker: the tests compare
    the two.
    """
    started = time.perf_counter()
    check_device(device)
    _check(config)
    check_ranks(config, ranks)
    base = resolve_base(config.base)
    specs = check_plans(config, base.unet_config)
    shapes = _shapes(base, resolution_of(config, base))
    encoders, note = encoder_bytes(base)
    found = [_cached_stage_peak(config, base, specs, k, shapes, device, fake) for k in range(len(specs))]
    peaks, reused = tuple(peak for peak, _ in found), sum(hit for _, hit in found)
    if ranks > 1:
        peaks = tuple(
            shard(peak, spec.config, ranks, config.mixed_precision) for peak, spec in zip(peaks, specs)
        )
    text_len = _text_len(base)
    phases = memory_phases.run_phases(config, base, specs, peaks, device, shapes.latent_size * base.vae_scale_factor,
                                      encoders, text_len) if ranks == 1 else ()  # fmt: skip
    notes = [n for n in (note, _shard_note(ranks)) if n]
    if reused:
        notes.append(f"{reused} of {len(specs)} stage peaks reused from an earlier estimate in this process")
    if config.lcd_reward:
        notes.append(
            "the RG-LCD reward is not counted: add its weights and the activations of its forward "
            "and backward at the batch (the toy proxy: 90k parameters, a few MiB)"
        )
    if config.freeze_sensitive:
        notes.append(
            "--freeze-sensitive is not applied: the frozen layers come from the sensitivity map; "
            "the estimate trains every layer (an upper bound)"
        )
    return MemoryEstimate(
        device=device,
        stages=peaks,
        settings=settings_of(config, base, shapes.latent_size * base.vae_scale_factor) | {"ranks": ranks},
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
        phases=phases,
    )


# --------------------------------------------------------------------------- sharded (FSDP)

# The units workbench/configs/accelerate-fsdp.yaml wraps (fsdp_transformer_layer_cls_to_wrap)
FSDP_UNITS = ("BasicTransformerBlock", "ResnetBlock2D")


def check_ranks(config, ranks: int) -> None:
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise WorkbenchError(
            f"ranks must be a whole number >= 1 (processes sharing the student), got {ranks!r}"
        )
    if ranks > 1 and config.lora_rank:
        raise WorkbenchError(
            "--ranks with --lora-rank: LoRA runs are not sharded (launch them with DDP); use one"
        )
    if ranks > 1 and config.has_lcd:  # the recipe refuses it: FSDP cannot copy the student
        raise WorkbenchError(
            "--ranks with an lcd stage: its EMA target network is a copy of the student, which FSDP "
            "cannot make (launch it with DDP); use one"
        )


def unit_bytes(student_config: dict[str, Any]) -> tuple[int, list[int]]:
    """(bytes of the parameters outside any FSDP unit: the root's, bytes of each unit), fp32."""
    model = meta_unet(student_config)
    units = [
        4 * sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in FSDP_UNITS
    ]
    return 4 * sum(p.numel() for p in model.parameters()) - sum(units), units


def shard(peak: StagePeak, student_config: dict[str, Any], ranks: int, mixed_precision: str) -> StagePeak:
    """One of ``ranks`` FSDP processes (full shard, ``accelerate-fsdp.yaml``): the student's
    weights, gradients and optimizer states split ``ranks`` ways, plus what is gathered whole
    at a time: the root's parameters (kept through the step) and two units (the one running
    and the one prefetched), in the compute dtype; a unit's full gradients before they are
    reduce-scattered. The teacher, the batch and activations are those of one process."""
    root, units = unit_bytes(student_config)
    largest = max(units, default=0)
    low = 2 if mixed_precision in ("bf16", "fp16") else 4
    gathered = (root + 2 * largest) * low // 4
    weights, grads, states = (
        peak.resident["weights"],
        peak.categories["gradients"],
        peak.resident["optimizer_states"],
    )
    categories = dict(peak.categories)
    categories["weights"] += -weights + -(-weights // ranks) + gathered
    categories["gradients"] = -(-grads // ranks) + (largest if grads else 0)
    categories["optimizer"] = -(-categories["optimizer"] // ranks)  # states and step temporaries: on shards
    resident = peak.resident | {"weights": -(-weights // ranks), "optimizer_states": -(-states // ranks)}
    return dataclasses.replace(peak, total=sum(categories.values()), categories=categories, resident=resident)


def _shard_note(ranks: int) -> str | None:
    if ranks == 1:
        return None
    return (
        f"per process of {ranks} under FSDP (workbench/configs/accelerate-fsdp.yaml): the student's weights, "
        "gradients and optimizer states split {ranks} ways, plus the root and two blocks gathered whole at a "
        "time; the teacher, batch and activations as one process"
    ).replace("{ranks}", str(ranks))


def _check(config) -> None:
    """The options the estimate reads, checked as the recipe checks them (device aside)."""

    checks = [
        (isinstance(config.batch_size, int) and config.batch_size > 0, f"batch size must be > 0, got {config.batch_size!r}"),
        (isinstance(config.grad_accum, int) and config.grad_accum > 0, f"gradient accumulation must be > 0, got {config.grad_accum!r}"),
        (config.feature_mode in FEATURE_MODES, f"unknown feature mode {config.feature_mode!r}; choose one of {', '.join(FEATURE_MODES)}"),
        (config.mixed_precision in PRECISIONS, f"unknown mixed precision {config.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}"),
        (config.teacher_dtype in TEACHER_DTYPES, f"unknown teacher dtype {config.teacher_dtype!r}; choose one of {', '.join(TEACHER_DTYPES)}"),
        (config.stage_teacher in STAGE_TEACHERS, f"unknown stage teacher {config.stage_teacher!r}; choose one of {', '.join(STAGE_TEACHERS)}"),
        (len(config.stages) > 0, "the estimate needs at least one stage (a preset)"),
        (config.teacher_targets in TEACHER_TARGETS, f"unknown teacher targets {config.teacher_targets!r}; choose one of {', '.join(TEACHER_TARGETS)}"),
        (config.optimizer in OPTIMIZERS, f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
        (isinstance(config.lora_rank, int) and config.lora_rank >= 0, f"LoRA rank must be a whole number >= 0 (0: full weights), got {config.lora_rank!r}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise WorkbenchError(message)
    check_objectives(config)  # one known kind per stage, lcd last
    if config.has_lcd:
        check_lcd_combination(config)  # no KD LoRA, no precomputed targets


def settings_of(config, base, resolution: int) -> dict[str, Any]:
    """The options that decide the estimate, as the report lists them."""
    return {
        "base": base.name,
        "plans": [s.get("name") for s in config.stages],
        "stage_kinds": [config.stage_kind(k) for k in range(len(config.stages))],
        "resolution": resolution,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "teacher_dtype": config.teacher_dtype,
        "mixed_precision": config.mixed_precision,
        "gradient_checkpointing": config.gradient_checkpointing,
        "feature_mode": config.feature_mode,
        "teacher_runs": config.w_out > 0 or (config.w_feat > 0 and config.feature_mode != "none"),
        "optimizer": config.optimizer,
        "lora_rank": config.lora_rank,
        "lcd_lora_rank": config.lcd_lora_rank,
        "teacher_targets": config.teacher_targets,
    }


# --------------------------------------------------------------------------- what would fit


def suggestions(
    config, first: MemoryEstimate, sizes_gb: tuple[int, ...] = GPU_SIZES_GB
) -> list[dict[str, Any]]:
    """For each GPU size the run does not fit, the cheapest options that make it fit, each rung
    estimated like the run itself (``memory_advice.ladder``)."""
    ranks = first.settings.get("ranks", 1)
    return memory_advice.ladder(config, first, lambda c: estimate(c, first.device, ranks=ranks), sizes_gb)


def out_of_memory(config, accelerator=None) -> str:
    """The one-line error of a run that ran out of memory: on a GPU, the cheapest options the
    estimate says fit it; otherwise (or if none does) the options not tried yet."""
    device = getattr(accelerator, "device", None)
    untried = memory_advice.untried(config)
    where = f"out of memory on {device}" if device is not None else "out of memory"
    if device is not None and torch.device(device).type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory / GIB
        where += f" ({capacity:.0f} GiB)"
        try:
            rows = suggestions(config, estimate(config), sizes_gb=(capacity,))
        except (WorkbenchError, RuntimeError):
            rows = []
        if rows and rows[0]["fits"]:
            return f"{where}: the memory estimate says it fits with {rows[0]['flags']} (peak {rows[0]['total_gb']:.1f} GiB)"
    if not untried:
        return f"{where}, with every memory-lean option on: use a GPU with more memory"
    return (
        f"{where}: try, cheapest first, {', '.join(untried)}; `python -m workbench memory` with the run's "
        "options says which of them fit"
    )
