"""Will it fit? The peak GPU memory of a distillation run, computed without allocating.

The estimate runs the run's real training step (teacher forward with the feature hooks,
student forward and backward, ``losses.distillation_loss``, gradient clipping, optimizer
step) on *fake* tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): every op
computes shapes and dtypes, no memory is touched, so SDXL at 1024 px is estimated on a
laptop CPU. Models are built on the meta device and turned into fake tensors; nothing is
loaded. A dispatch-level tracker follows every tensor storage from creation to release and
puts it in one category:

- ``teacher``: the teacher's weights (in ``--teacher-dtype``);
- ``weights``: the student's weights (fp32, as the recipe trains them);
- ``target``: an ``lcd`` stage's EMA target network, a full copy of the student (its
  guidance embedding or LCM-LoRA adapters included), never trained directly;
- ``gradients``: the student's ``.grad`` tensors;
- ``optimizer``: optimizer states, and the optimizer step's (and gradient clipping's)
  temporary tensors;
- ``activations``: everything else the step allocates: the batch, activations saved for
  backward, autocast's low-precision weight copies, teacher outputs and captured features,
  backward temporaries;
- ``encoders``: the pipeline's text encoders and VAE. The recipe encodes the data once and
  then parks them on the CPU, so a student step holds none of them (0); they come back,
  with the teacher, only for sample grids (a note gives that figure for ``--sample-every``).

An ``lcd`` stage (latent consistency distillation, ``losses.OBJECTIVES["lcd"]``) runs its
own step: the guided teacher over the doubled batch (prompt and empty prompt) and the
target network, both without gradients, then the student (with the guidance embedding, or
LCM-LoRA adapters on its frozen weights) with them, and the target's EMA update.

With ``--teacher-targets precompute`` the teacher runs first, over every micro-batch of the
stage (phase ``precompute``: student weights and teacher resident, no optimizer states yet),
and then leaves the device: a student step holds no teacher weights, only its targets read
back from disk (``activations``); the bytes they take on disk per step are reported.

The categories of the peak add up to its total. The step is run once per stage; the peak is
the steady state of a long run: optimizer states created by the first step are counted in
every phase before it too (a later step's forward and backward run with them resident).

``target`` says whose memory rules apply. ``cuda`` (default) is what the verdicts are for:
AdamW and gradient clipping use their CUDA defaults (``foreach``, with a parameter-sized
temporary), and mixed precision follows CUDA autocast's op lists (norms, upsampling,
softmax and losses in fp32; convolutions, matmuls and attention in low precision), applied
by a small emulation (``_CudaAutocast``) because fake tensors here live on the CPU. ``cpu``
follows the CPU defaults and torch's own CPU autocast: that is the target the validation
benchmark (``benchmarks/memory.py``) compares with the measured peak of the same real step.
Attention runs through ``scaled_dot_product_attention`` on both (a fused kernel that never
materialises the attention matrix, like flash / memory-efficient attention on a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from workbench import lora_kd, losses, optim
from workbench import stage as recipe_stage
from workbench.catalog import meta_unet
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
from workbench.lora_kd import init_spec
from workbench.losses import TeacherTargets
from workbench.models import resolve_base
from workbench.optim import BLOCK, MIN_8BIT_SIZE, make_optimizer
from workbench.schedulers import LCM_ORIGINAL_STEPS
from workbench.surgery import FEATURE_MODES, GUIDANCE_EMBED_DIM
from workbench.targets import TargetStore

CATEGORIES = ("teacher", "weights", "target", "gradients", "optimizer", "activations", "encoders")
TARGETS = ("cuda", "cpu")
GPU_SIZES_GB = (16, 24, 40, 48, 80)
GIB = 2**30
# What a CUDA process holds beside its tensors: the context, cuBLAS/cuDNN workspaces (about
# 0.5-1 GiB), and the caching allocator's rounding and fragmentation (reserved memory is
# typically 5-15% above allocated). A verdict of "fits" keeps this margin free.
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.10
# Parameters of the pipeline parts a built-in config has no files for (public model facts).
_BUILTIN_ENCODERS = {
    "sdxl-base": {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
    "sd15-base": {"text_encoder": 123_060_480, "vae": 83_653_863},
}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


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
    targets_disk_bytes: int = 0  # per optimizer step and process (--teacher-targets precompute)
    kind: str = "kd"  # what the stage optimises (losses.OBJECTIVES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device memory of a run: the largest stage peak, by category, with its verdicts."""

    target: str
    stages: tuple[StagePeak, ...]
    settings: dict[str, Any]
    notes: tuple[str, ...]
    seconds: float

    @property
    def peak(self) -> StagePeak:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        return self.peak.total

    @property
    def categories(self) -> dict[str, int]:
        return self.peak.categories

    def needed(self) -> int:
        """Device memory to ask for: the peak plus the CUDA context and allocator margin."""
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
            "target": self.target,
            "total_bytes": self.total,
            "total_gb": round(self.total / GIB, 3),
            "needed_gb": round(self.needed() / GIB, 3),
            "categories_bytes": dict(self.categories),
            "categories_gb": {k: round(v / GIB, 3) for k, v in self.categories.items()},
            "peak_stage": peak.stage,
            "peak_phase": peak.phase,
            "stages": [s.to_dict() for s in self.stages],
            "verdicts": self.verdicts(),
            "settings": self.settings,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 2),
        }


# --------------------------------------------------------------------------- tracking


class _Tracker(TorchDispatchMode):
    """Bytes of every live tensor storage, by category; the peak of each phase of the step.

    A storage is counted once, when an op first returns it, under the category current at
    that moment (``claim`` files known tensors, e.g. weights, under their own); it leaves the
    count when its storage is freed (a weakref callback).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.category = "activations"
        self.phase = "setup"
        self.label = ""  # the micro-batch, when there are several
        self.peaks: dict[str, tuple[int, dict[str, int]]] = {}
        self._live: dict[int, list[Any]] = {}  # id(storage) -> [bytes, category, weakref]

    def claim(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category`` (moving it there if already counted)."""
        self._add(tensor, category, move=True)

    def _add(self, tensor: torch.Tensor, category: str, move: bool) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._live.get(key)
        if known is not None and known[2]() is storage:
            if move and known[1] != category:
                self.current[known[1]] -= known[0]
                self.current[category] += known[0]
                known[1] = category
            return
        size = storage.nbytes()
        self._live[key] = [size, category, weakref.ref(storage, self._released(key))]
        self.current[category] += size
        self.total += size
        best = self.peaks.get(self.phase)
        if best is None or self.total > best[0]:
            self.peaks[self.phase] = (self.total, dict(self.current))

    def release(self, tensors: list[Any]) -> None:
        """Stop counting ``tensors``' storages, as if freed: they left the device (parked on
        the CPU, written to disk)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._released(id(tensor.untyped_storage()))(None)

    def _released(self, key: int):
        def release(_ref: Any) -> None:
            record = self._live.pop(key, None)
            if record is not None:
                self.current[record[1]] -= record[0]
                self.total -= record[0]

        return release

    def enter(self, phase: str, category: str = "activations") -> None:
        """From now on the step is in ``phase`` (plus the micro-batch ``label``); new tensors
        go to ``category``."""
        self.phase, self.category = phase + self.label, category
        best = self.peaks.get(self.phase)
        if best is None or self.total > best[0]:
            self.peaks[self.phase] = (self.total, dict(self.current))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self._add(leaf, self.category, move=False)
        return out


# --------------------------------------------------------------------------- CUDA autocast

# CUDA autocast's op lists (torch's autocast_mode.h, AT_FORALL_* for CUDA), by the name of
# the Python-level function that reaches them.
_LOWER = frozenset(
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d conv_tbc prelu "
    "addmm addmv addr matmul __matmul__ __rmatmul__ einsum mm mv linear addbmm baddbmm bmm "
    "chain_matmul multi_dot linalg_vecdot scaled_dot_product_attention".split()
)
_FP32 = frozenset(
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__ "
    "__rpow__ __rtruediv__ __rdiv__ softplus layer_norm group_norm cosine_similarity "
    "poisson_nll_loss cosine_embedding_loss nll_loss hinge_embedding_loss kl_div l1_loss "
    "smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss "
    "triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm "
    "logsumexp interpolate upsample upsample_nearest upsample_bilinear".split()
)
_FP32_OPT_DTYPE = frozenset("prod softmax log_softmax cumprod cumsum sum".split())
_LOW = (torch.float16, torch.bfloat16)


class _CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casting rules, applied to (fake) CPU tensors.

    Like autocast, it casts before autograd records the op, so the low-precision copies are
    what backward saves; casts of trainable weights are cached until the context exits.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, tuple[Any, torch.Tensor]] = {}

    def __exit__(self, *exc: Any) -> None:
        self._cache.clear()
        super().__exit__(*exc)

    @contextlib.contextmanager
    def reentered(self):
        """The mode back on the stack (a checkpointed layer recomputing inside backward)."""
        from torch.overrides import _pop_mode, _push_mode

        _push_mode(self)
        try:
            yield
        finally:
            _pop_mode()

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        if value.dtype in (dtype, torch.float64):
            return value
        if value.is_leaf and value.requires_grad and dtype in _LOW:
            hit = self._cache.get(id(value))
            if hit is not None and hit[0]() is value:
                return hit[1]
            cast = value.to(dtype)
            self._cache[id(value)] = (weakref.ref(value), cast)
            return cast
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _LOWER:
            args = self._cast(args, self.dtype)
            kwargs = {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        elif name in _FP32:
            args = self._cast(args, torch.float32)
            kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        elif name in _FP32_OPT_DTYPE and kwargs.get("dtype") is None:
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.dtype in _LOW:
                kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


def _checkpoint(module, *args):
    """diffusers' gradient checkpointing (non-reentrant ``torch.utils.checkpoint``), with the
    CUDA autocast emulation restored for the recompute, as checkpoint restores autocast."""
    from torch.overrides import _get_current_function_mode_stack

    outer = [m for m in _get_current_function_mode_stack() if isinstance(m, _CudaAutocast)]

    def run(*inputs):
        active = _get_current_function_mode_stack()
        if not outer or outer[-1] in active:
            return module(*inputs)
        with outer[-1].reentered():
            return module(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _autocast(mixed_precision: str, target: str):
    """The autocast context the recipe's student forward runs in (accelerate's, per target)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if target == "cuda":
        return _CudaAutocast(dtype)
    return torch.autocast("cpu", dtype=dtype)


# --------------------------------------------------------------------------- models and batch


def _unet(config: dict[str, Any], mode, dtype: torch.dtype, adapt=None):
    """A ``UNet2DConditionModel`` of ``config`` whose tensors are fake (no memory, no init);
    with ``mode`` None, a real one (random weights: for measuring the estimate). ``adapt``
    changes the model before its tensors become fake (LoRA adapters)."""

    if mode is None:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        model = model.to(dtype)
        if adapt is not None:
            adapt(model)
        return model
    model = meta_unet(config)
    if adapt is not None:
        adapt(model)
    device = torch.device("cpu")
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = torch._subclasses.fake_tensor.FakeTensor(
                        mode, torch.empty_like(p, dtype=dtype), device
                    )
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    b_dtype = dtype if b.is_floating_point() else b.dtype
                    module._buffers[name] = torch._subclasses.fake_tensor.FakeTensor(
                        mode, torch.empty_like(b, dtype=b_dtype), device
                    )
    return model


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
    batch = {"inputs": inputs, "target": torch.randn(b, c, s, s)}
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


# --------------------------------------------------------------------------- the step


@dataclass
class _Stage:
    """One stage's fake models, as the recipe's ``Distillation.stage`` makes them."""

    kind: str  # losses.OBJECTIVES
    student: Any
    teacher: Any
    pairs: list[tuple[str, str]]
    target: Any = None  # an lcd stage's EMA target network


def _stage_models(config, base, specs, k: int, mode) -> _Stage:

    spec, init = specs[k], init_spec(specs, k)  # init: the student's map to what it starts from
    dtype, kind = recipe_stage.TEACHER_DTYPES[config.teacher_dtype], config.stage_kind(k)
    teacher_config, pairs = base.unet_config, spec.feature_pairs(config.feature_mode)
    if k > 0 and config.stage_teacher == "previous":  # the original UNet is parked on the CPU
        teacher_config, pairs = specs[k - 1].config, init.feature_pairs(config.feature_mode)
    teacher = _unet(teacher_config, mode, dtype).eval().requires_grad_(False)
    student_config, adapt = spec.config, _adapter(config, init, kind)
    if kind == "lcd":
        pairs = []
        if not config.lcd_lora_rank:  # LCM's w-conditioning: surgery.with_guidance_embedding
            student_config = dict(spec.config) | {"time_cond_proj_dim": GUIDANCE_EMBED_DIM}
    student = _unet(student_config, mode, torch.float32, adapt).train()
    if adapt is None:
        student.requires_grad_(True)
    target = None
    if kind == "lcd":  # a copy of the student as it starts (adapters too), never trained
        target = _unet(student_config, mode, torch.float32, adapt).eval().requires_grad_(False)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing(_checkpoint)
    return _Stage(kind, student, teacher, pairs, target)


def _adapter(config, init, kind: str):
    """What puts the stage's adapters on a student (None: full weights train): LoRA-enhanced
    KD's, or LCM-LoRA's on an lcd stage."""

    if kind == "lcd" and config.lcd_lora_rank:
        return lambda model: lora_kd.add_consistency_adapters(model, config.lcd_lora_rank)
    if kind != "lcd" and config.lora_rank:
        return lambda model: lora_kd.add_adapters(model, init, config.lora_rank)
    return None


def _optimizer(config, params: list[torch.Tensor], target: str) -> torch.optim.Optimizer:
    """The run's optimizer: AdamW with the target's default implementation (foreach on
    CUDA), or 8-bit AdamW's states as bitsandbytes lays them out."""

    if config.optimizer == "adamw8bit":
        return _AdamW8bitLayout(params, lr=config.lr)
    optimizer = make_optimizer(params, config)
    for group in optimizer.param_groups:  # torch's default differs by device: CUDA's is foreach
        group["foreach"] = target == "cuda"
    return optimizer


class _AdamW8bitLayout(torch.optim.Optimizer):
    """bitsandbytes' 8-bit AdamW, as far as memory goes: the same states (two uint8 moments
    and an fp32 scale per block of 256 for tensors of >= 4096 elements, fp32 moments for
    smaller ones, a shared 256-entry code book per moment), updated in place as its fused
    kernel does (bitsandbytes' own step can't run on fake tensors: it reads values)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self._qmaps: tuple[torch.Tensor, torch.Tensor] | None = None

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:

        if p.numel() < MIN_8BIT_SIZE:
            return {"step": 0, "state1": torch.zeros_like(p), "state2": torch.zeros_like(p)}
        if self._qmaps is None:
            self._qmaps = (torch.zeros(256, device=p.device), torch.zeros(256, device=p.device))
        blocks = -(-p.numel() // BLOCK)
        return {"step": 0, "state1": torch.zeros_like(p, dtype=torch.uint8),
                "state2": torch.zeros_like(p, dtype=torch.uint8), "qmap1": self._qmaps[0],
                "qmap2": self._qmaps[1], "absmax1": torch.zeros(blocks, device=p.device),
                "absmax2": torch.zeros(blocks, device=p.device)}  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self.state or not self.state[p]:
                    self.state[p] = self._init_state(p)
                self.state[p]["step"] += 1
                p.add_(p.grad, alpha=-group["lr"])


class _Accelerator:
    """What ``distill.train_step`` asks of accelerate, for one process on ``target``; it
    also tells the tracker where in the step it is."""

    num_processes = 1

    def __init__(self, config, target: str, tracker: _Tracker) -> None:
        self.config, self.target, self.tracker = config, target, tracker

    def no_sync(self, _model):
        return contextlib.nullcontext()

    def autocast(self):
        return _autocast(self.config.mixed_precision, self.target)

    def backward(self, loss: torch.Tensor) -> None:
        self.tracker.enter("backward")
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float):
        self.tracker.enter("optimizer step", "optimizer")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.target == "cuda")


def _setup(config, models: _Stage, schedule: tuple[list[float], str] | None = None):
    """The stage objective's setup, as the recipe makes it (``Distillation.stage``,
    ``Distillation.lcd_setup``); an lcd stage's needs the teacher's ``_noise_schedule``."""

    if models.kind == "lcd":
        alphas, prediction = torch.tensor(schedule[0]), schedule[1]  # (T,) on the device
        return losses.LCDSetup(alphas, prediction, config.lcd_guidance, models.target, config.lcd_ema,
                               config.lcd_loss, config.lcd_huber_c, LCM_ORIGINAL_STEPS)  # fmt: skip
    pairs = models.pairs if config.w_feat > 0 else []
    return losses.KDSetup(config.weights, pairs, config.normalize_features, None)


def _noise_schedule(base) -> tuple[list[float], str]:
    """(alphas_cumprod (T,), prediction type) of the teacher's scheduler (a stock DDPM
    schedule where the base has no scheduler file)."""
    from diffusers import DDPMScheduler

    path = Path(base.location or ".") / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if base.location and path.exists() else {}
    schedule = DDPMScheduler.from_config(config)
    return schedule.alphas_cumprod.tolist(), schedule.config.prediction_type


@dataclass(frozen=True)
class _Stored(TargetStore):
    """Precomputed targets as a step reads them back: fresh device tensors each read."""

    held: Any = None  # losses.TeacherTargets

    def read(self, g: int, micro: int):

        pred = None if self.held.pred is None else torch.empty_like(self.held.pred)
        return TeacherTargets(pred, {k: torch.empty_like(v) for k, v in self.held.features.items()})


def _precompute(config, models: _Stage, shapes: _Shapes, tracker: _Tracker) -> tuple[_Stored, int]:
    """The recipe's precompute before a stage (a micro-batch stands for all): the teacher's
    forward with the student's weights resident, then teacher and targets leave the device.
    Returns the store the step reads from and the targets' bytes per micro-batch."""

    tracker.enter("precompute (teacher targets)")
    held = losses.teacher_targets(models.teacher, _batch(shapes, config.batch_size), _setup(config, models))
    tensors = [held.pred, *held.features.values()]
    tracker.release([*tensors, *models.teacher.parameters(), *models.teacher.buffers()])
    size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return _Stored(Path("."), held=held), size


def _train_step(config, models: _Stage, optimizer, shapes: _Shapes, target: str, tracker: _Tracker,
                store: _Stored | None = None, schedule=None) -> None:  # fmt: skip
    """The recipe's own optimizer step (``distill.train_step``), phases marked for the tracker.

    Two micro-batches stand for any gradient accumulation: from the second on, the
    gradients of the earlier ones are resident while the next runs.
    """

    config = dataclasses.replace(config, grad_accum=min(config.grad_accum, 2))
    labels = config.grad_accum > 1

    def batches(_g: int, micro: int) -> dict[str, Any]:
        tracker.label = f" (micro-batch {micro + 1})" if labels else ""
        tracker.enter("batch")
        return _batch(shapes, config.batch_size, consistency=models.kind == "lcd")

    setup = _setup(config, models, schedule)
    handles = [
        models.teacher.register_forward_pre_hook(lambda *_: tracker.enter("teacher forward")),
        models.student.register_forward_pre_hook(lambda *_: tracker.enter("student forward")),
        optimizer.register_step_pre_hook(lambda *_: tracker.enter("optimizer step", "optimizer")),
    ]
    if models.target is not None:
        handles.append(models.target.register_forward_pre_hook(lambda *_: tracker.enter("target forward")))
    stage = recipe_stage.Stage(0, models.kind, models.student, models.student, store or models.teacher, setup,
                          optimizer, optim.make_schedule(optimizer, config), _Accelerator(config, target, tracker), 0)  # fmt: skip
    try:
        recipe_stage.train_step(stage, batches, 0, config)
    finally:
        for handle in handles:
            handle.remove()


def _stage_peak(config, base, specs, k: int, shapes: _Shapes, target: str, fake: bool = True) -> StagePeak:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # a shape environment lets the step read its loss terms (``.item()``) as symbols
    mode = FakeTensorMode(shape_env=ShapeEnv()) if fake else None
    models = _stage_models(config, base, specs, k, mode)
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    tracker = _Tracker()
    precompute, disk = config.teacher_targets == "precompute", 0
    schedule = _noise_schedule(base) if models.kind == "lcd" else None  # real values, before the mode
    for t in (*models.teacher.parameters(), *models.teacher.buffers()):
        tracker.claim(t, "teacher")
    for t in (*models.student.parameters(), *models.student.buffers()):
        tracker.claim(t, "weights")
    target_tensors = [*models.target.parameters(), *models.target.buffers()] if models.target else []
    for t in target_tensors:
        tracker.claim(t, "target")
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.claim(p.grad, "gradients")) for p in trainable
    ]
    try:
        with mode or contextlib.nullcontext():
            store = None
            if precompute:  # before the optimizer exists, as the recipe does it
                with tracker:
                    store, disk = _precompute(config, models, shapes, tracker)
            optimizer = _optimizer(config, trainable, target)
            with tracker:
                _train_step(config, models, optimizer, shapes, target, tracker, store, schedule)
            states = _state_bytes(optimizer)
    finally:
        for hook in hooks:
            hook.remove()
    phase, total, categories = _steady_peak(tracker.peaks, states)
    spec = specs[k]
    return StagePeak(
        stage=k + 1,
        plan=spec.plan.name,
        total=total,
        categories=categories,
        phase=phase,
        resident={
            "weights": _storage_bytes([*models.student.parameters(), *models.student.buffers()]),
            "teacher": 0
            if precompute
            else _storage_bytes([*models.teacher.parameters(), *models.teacher.buffers()]),
            "optimizer_states": states,
            "target": _storage_bytes(target_tensors),
            "encoders": 0,  # parked on the CPU during student steps
        },
        student_params=spec.student_params,
        trainable_params=sum(p.numel() for p in trainable),
        teacher_params=sum(p.numel() for p in models.teacher.parameters()),
        targets_disk_bytes=disk * config.grad_accum,
        kind=models.kind,
    )


# Stage peaks already estimated in this process (the app's repeated estimates, the ladder of
# suggestions, a kd stage shared by runs that differ later): exact, since a stage's peak is a
# pure function of the key below. Most of an estimate is fake-tensor dispatch (~0.3 ms an op).
_PEAKS: OrderedDict[str, StagePeak] = OrderedDict()
_PEAKS_KEPT = 64
# Options no step reads: they change nothing a stage holds.
_NOT_IN_A_STEP = ("steps", "seed", "data", "toy_samples", "log_every", "checkpoint_every", "keep_checkpoints",
                  "sample_every", "sample_steps", "sample_prompts", "teacher_image_steps")  # fmt: skip


def _peak_key(config, base, k: int, target: str) -> str:
    """What stage ``k``'s peak depends on: the options, the stages up to it (its plan and
    the one it starts from) and their kinds, the teacher's UNet and files, the target."""
    fields = {n: v for n, v in config.to_dict().items() if n not in _NOT_IN_A_STEP}
    fields |= {
        "stages": fields["stages"][: k + 1],
        "objectives": [config.stage_kind(i) for i in range(k + 1)],
    }
    teacher = {"name": base.name, "location": str(base.location), "unet": base.unet_config}
    return json.dumps([fields, teacher, k, target, torch.__version__], sort_keys=True, default=str)


def _cached_stage_peak(config, base, specs, k: int, shapes: _Shapes, target: str,
                       fake: bool) -> tuple[StagePeak, bool]:  # fmt: skip
    """(stage ``k``'s peak, whether it was kept from an earlier estimate)."""
    if not fake:  # the real step is the check of the fake one: always run
        return _stage_peak(config, base, specs, k, shapes, target, fake), False
    key = _peak_key(config, base, k, target)
    peak = _PEAKS.get(key)
    if peak is None:
        _PEAKS[key] = _stage_peak(config, base, specs, k, shapes, target, fake)
        while len(_PEAKS) > _PEAKS_KEPT:
            _PEAKS.popitem(last=False)
    _PEAKS.move_to_end(key)
    return _PEAKS[key], peak is not None


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _storage_bytes([v for state in optimizer.state.values() for v in state.values()])


def _storage_bytes(values: list[Any]) -> int:
    """Bytes of the distinct storages behind ``values`` (views and shared storages once)."""
    seen: dict[int, int] = {}
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def _steady_peak(
    peaks: dict[str, tuple[int, dict[str, int]]], states: int
) -> tuple[str, int, dict[str, int]]:
    """The step's peak in a long run: phases before the first optimizer step ran without the
    optimizer states it created; every later step runs them with the states resident."""
    best: tuple[str, int, dict[str, int]] | None = None
    for phase, (total, categories) in peaks.items():
        categories = dict(categories)
        if not phase.startswith(("optimizer step", "precompute")):  # precompute: no optimizer yet
            categories["optimizer"] += states
            total += states
        if best is None or total > best[1]:
            best = (phase, total, categories)
    if best is None or sum(best[2].values()) != best[1]:
        raise RuntimeError("memory tracker lost count: categories do not add up to the total")
    return best


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
    return resolution


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise WorkbenchError(f"unknown memory target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


def estimate(config, target: str = "cuda", fake: bool = True, ranks: int = 1) -> MemoryEstimate:
    """Peak memory of one process of a run of ``config`` (a ``DistillConfig``), on ``target``;
    with ``ranks`` > 1, of one of that many FSDP processes (``shard``).

    Nothing is loaded or allocated; models are built from their configs. Seconds for SDXL
    at 1024 px on a CPU, most of it running the fake step. ``fake=False`` runs the same step
    on real tensors (random weights, on the CPU) under the same tracker: the tests compare
    the two.
    """

    started = time.perf_counter()
    check_target(target)
    _check(config)
    check_ranks(config, ranks)
    base = resolve_base(config.base)
    specs = check_plans(config, base.unet_config)
    shapes = _shapes(base, resolution_of(config, base))
    encoders, note = encoder_bytes(base)
    found = [_cached_stage_peak(config, base, specs, k, shapes, target, fake) for k in range(len(specs))]
    peaks, reused = tuple(peak for peak, _ in found), sum(hit for _, hit in found)
    if ranks > 1:
        peaks = tuple(
            shard(peak, spec.config, ranks, config.mixed_precision) for peak, spec in zip(peaks, specs)
        )
    notes = [n for n in (note, _sampling_note(config, peaks, encoders), _shard_note(ranks)) if n]
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
        target=target,
        stages=peaks,
        settings=settings_of(config, base, shapes.latent_size * base.vae_scale_factor) | {"ranks": ranks},
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
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


def _sampling_note(config, peaks: tuple[StagePeak, ...], encoders: int) -> str | None:
    """Sample grids during training bring the parked pipeline back beside the student."""
    if not config.sample_every:
        return None
    r = max(peaks, key=lambda p: sum(p.resident.values())).resident
    teacher = max(p.teacher_params for p in peaks) * {"fp32": 4}.get(config.teacher_dtype, 2)
    held = r["weights"] + r["optimizer_states"] + teacher + encoders
    return (
        f"--sample-every {config.sample_every}: each grid brings the teacher and the text encoders and VAE "
        f"back beside the student and its optimizer states: {gib(held)} resident, plus sampling activations"
    )


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


@dataclass(frozen=True)
class LeanOption:
    """One memory-saving change to a run's config, cheapest (in quality and speed) first."""

    name: str
    flags: str  # how the user asks for it
    applies: Any  # config -> bool: would it change anything?
    apply: Any  # config -> config


def _halve_batch(config):
    return dataclasses.replace(config, batch_size=config.batch_size // 2, grad_accum=config.grad_accum * 2)


LEAN_OPTIONS: tuple[LeanOption, ...] = (
    LeanOption(
        "teacher in bf16",
        "--teacher-dtype bf16",
        lambda c: c.teacher_dtype == "fp32",
        lambda c: dataclasses.replace(c, teacher_dtype="bf16"),
    ),
    LeanOption(
        "bf16 mixed precision",
        "--mixed-precision bf16",
        lambda c: c.mixed_precision == "no",
        lambda c: dataclasses.replace(c, mixed_precision="bf16"),
    ),
    LeanOption(
        "gradient checkpointing (slower steps, same result)",
        "--gradient-checkpointing",
        lambda c: not c.gradient_checkpointing,
        lambda c: dataclasses.replace(c, gradient_checkpointing=True),
    ),
    LeanOption(
        "teacher targets precomputed to disk (the teacher off the GPU during student steps)",
        "--teacher-targets precompute",
        lambda c: (
            c.teacher_targets == "live"
            and not c.has_lcd  # an lcd stage's targets need the live teacher and target network
            and (c.w_out > 0 or (c.w_feat > 0 and c.feature_mode != "none"))
        ),
        lambda c: dataclasses.replace(c, teacher_targets="precompute"),
    ),
    LeanOption(
        "8-bit AdamW (bitsandbytes; a quarter of AdamW's states)",
        "--optimizer adamw8bit",
        lambda c: c.optimizer == "adamw",
        lambda c: dataclasses.replace(c, optimizer="adamw8bit"),
    ),
    LeanOption(
        "LoRA-enhanced distillation (adapters where a layer's input is unchanged)",
        "--lora-rank 64",
        lambda c: c.lora_rank == 0 and not c.has_lcd,
        lambda c: dataclasses.replace(c, lora_rank=64),
    ),
    LeanOption(
        "LCM-LoRA (adapters on the frozen student; its target network copies them)",
        "--lcd-lora-rank 64",
        lambda c: c.has_lcd and c.lcd_lora_rank == 0,
        lambda c: dataclasses.replace(c, lcd_lora_rank=64),
    ),
    LeanOption(
        "half the batch, twice the accumulation (same effective batch, slower)",
        "--batch-size B/2 --grad-accum 2A",
        lambda c: c.batch_size > 1 and c.batch_size % 2 == 0,
        _halve_batch,
    ),
)


def suggestions(
    config, first: MemoryEstimate, sizes_gb: tuple[int, ...] = GPU_SIZES_GB
) -> list[dict[str, Any]]:
    """For each GPU size the run does not fit, the cheapest options that make it fit.

    Options are added one at a time, cheapest first (``LEAN_OPTIONS``; halving the batch
    repeats down to 1), each rung estimated like the run itself, until every size fits or
    nothing is left to add.
    """
    ladder = [([], config, first)]
    missing = [gb for gb in sizes_gb if _verdict(first, gb) != "fits"]
    while missing:
        options, current, _ = ladder[-1]
        option = next((o for o in LEAN_OPTIONS if o.applies(current)), None)
        if option is None:
            break
        changed = option.apply(current)
        result = estimate(changed, first.target, ranks=first.settings.get("ranks", 1))
        ladder.append(([*options, option], changed, result))
        missing = [gb for gb in missing if _verdict(result, gb) != "fits"]
    rows = []
    for gb in sizes_gb:
        if _verdict(first, gb) == "fits":
            continue
        rung = next((r for r in ladder if _verdict(r[2], gb) == "fits"), None)
        rows.append(_suggestion_row(gb, rung))
    return rows


def _verdict(result: MemoryEstimate, gb: int) -> str:
    return next(v["verdict"] for v in result.verdicts((gb,)))


def _suggestion_row(gb: int, rung) -> dict[str, Any]:
    if rung is None:
        return {"gpu_gb": gb, "fits": False, "options": [], "flags": "", "total_gb": None}
    options, changed, result = rung
    flags = [o.flags for o in dict.fromkeys(options) if o.apply is not _halve_batch]
    if any(o.apply is _halve_batch for o in options):
        flags.append(f"--batch-size {changed.batch_size} --grad-accum {changed.grad_accum}")
    return {
        "gpu_gb": gb,
        "fits": True,
        "options": list(dict.fromkeys(o.name for o in options)),
        "flags": " ".join(flags),
        "total_gb": round(result.total / GIB, 3),
    }


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def report(result: MemoryEstimate, hints: list[dict[str, Any]] | None = None) -> str:
    """The estimate as plain text (the CLI prints it; the app shows it before Launch)."""
    s = result.settings
    plans = [f"{p} (lcd)" if kind == "lcd" else str(p) for p, kind in zip(s["plans"], s["stage_kinds"])]
    lines = [
        f"peak {gib(result.total)} per process ({result.target}) for {', '.join(plans)} on "
        f"{s['base']}, {s['resolution']} px, batch {s['batch_size']} x {s['grad_accum']} accumulation, "
        f"teacher {s['teacher_dtype']}, mixed precision {s['mixed_precision']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, teacher targets {s['teacher_targets']}; the peak is in stage {result.peak.stage}'s "
        f"{result.peak.phase}",
    ]
    for name in CATEGORIES:
        lines.append(f"  {name:<12} {gib(result.categories[name]):>12}")
    lines.append(f"  needs about {gib(result.needed())} with the CUDA context and allocator margin")
    disk = max(st.targets_disk_bytes for st in result.stages)
    if disk:
        lines.append(
            f"  precomputed teacher targets take {disk / 2**20:.1f} MiB of disk per step and process "
            f"({gib(disk * 1000)} per 1000 steps)"
        )
    lines.append("  " + "   ".join(f"{v['gpu_gb']} GB: {v['verdict']}" for v in result.verdicts()))
    for row in hints or []:
        if row["fits"]:
            lines.append(f"  to fit {row['gpu_gb']} GB: {row['flags']} (peak {row['total_gb']:.2f} GiB)")
        else:
            lines.append(f"  {row['gpu_gb']} GB: does not fit with the options the estimate knows")
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)


def out_of_memory(config, accelerator=None) -> str:
    """The one-line error of a run that ran out of memory: on a GPU, the cheapest options the
    estimate says fit it; otherwise (or if none does) the options not tried yet."""
    device = getattr(accelerator, "device", None)
    untried = [o.flags for o in LEAN_OPTIONS if o.applies(config)]
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
