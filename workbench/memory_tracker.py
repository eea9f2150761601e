"""The memory estimate's instruments: a tracker of tensor storages by category, the device's
rules (CUDA autocast emulated on CPU tensors, the optimizers' defaults), fake-tensor models.

A dispatch-level tracker (``Tracker``) follows every tensor storage from creation to release
and puts it in one category:

- ``teacher``: the teacher's weights (in ``--teacher-dtype``);
- ``weights``: the student's weights (fp32, as the recipe trains them);
- ``ema_target``: an ``lcd`` stage's EMA target network, a full copy of the student (its
  guidance embedding or LCM-LoRA adapters included), never trained directly;
- ``gradients``: the student's ``.grad`` tensors;
- ``optimizer``: optimizer states, and the optimizer step's (and gradient clipping's)
  temporary tensors;
- ``activations``: everything else the step allocates: the batch, activations saved for
  backward, autocast's low-precision weight copies, teacher outputs and captured features,
  backward temporaries;
- ``encoders``: the pipeline's text encoders and VAE. The recipe encodes the data once and
  then sets them aside (``models.TeacherPipeline``), so a student step holds none of them
  (0); they come back only for sample grids (``memory_phases``).

The device (``DEVICES``) says whose memory rules apply. ``cuda`` (default) is what the
verdicts are for: AdamW and gradient clipping use their CUDA defaults (``foreach``, with a
parameter-sized temporary), and mixed precision follows CUDA autocast's op lists (norms,
upsampling, softmax and losses in fp32; convolutions, matmuls and attention in low
precision), applied by a small emulation (``CudaAutocast``) because fake tensors here live
on the CPU. ``cpu`` follows the CPU defaults and torch's own CPU autocast: that is the
device the validation benchmark (``benchmarks/memory.py``) compares with the measured peak
of the same real step. Attention runs through ``scaled_dot_product_attention`` on both (a
fused kernel that never materialises the attention matrix, like flash / memory-efficient
attention on a GPU).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from workbench.optim import BLOCK, MIN_8BIT_SIZE, make_optimizer

CATEGORIES = ("teacher", "weights", "ema_target", "gradients", "optimizer", "activations", "encoders")
DEVICES = ("cuda", "cpu")  # whose memory rules the estimate follows
GIB = 2**30


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


class Tracker(TorchDispatchMode):
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


class CudaAutocast(TorchFunctionMode):
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


def checkpoint(module, *args):
    """diffusers' gradient checkpointing (non-reentrant ``torch.utils.checkpoint``), with the
    CUDA autocast emulation restored for the recompute, as checkpoint restores autocast."""
    outer = [m for m in _get_current_function_mode_stack() if isinstance(m, CudaAutocast)]

    def run(*inputs):
        active = _get_current_function_mode_stack()
        if not outer or outer[-1] in active:
            return module(*inputs)
        with outer[-1].reentered():
            return module(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def autocast(mixed_precision: str, device: str):
    """The autocast context the recipe's student forward runs in (accelerate's), on ``device``'s rules."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if device == "cuda":
        return CudaAutocast(dtype)
    return torch.autocast("cpu", dtype=dtype)


def fake_module(model: torch.nn.Module, mode) -> torch.nn.Module:
    """``model`` (built on the meta device) with fake tensors of ``mode`` for its parameters
    and buffers, in place: same dtypes, shapes and ``requires_grad``, no memory."""
    device = torch.device("cpu")
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = FakeTensor(mode, torch.empty_like(p, device="meta"), device)
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = FakeTensor(mode, torch.empty_like(b, device="meta"), device)
    return model


# --------------------------------------------------------------------------- optimizers


def optimizer_of(config, params: list[torch.Tensor], device: str) -> torch.optim.Optimizer:
    """The run's optimizer: AdamW with the device's default implementation (foreach on
    CUDA), or 8-bit AdamW's states as bitsandbytes lays them out."""
    if config.optimizer == "adamw8bit":
        return AdamW8bitLayout(params, lr=config.lr)
    optimizer = make_optimizer(params, config)
    for group in optimizer.param_groups:  # torch's default differs by device: CUDA's is foreach
        group["foreach"] = device == "cuda"
    return optimizer


class AdamW8bitLayout(torch.optim.Optimizer):
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
        return {
            "step": 0,
            "state1": torch.zeros_like(p, dtype=torch.uint8),
            "state2": torch.zeros_like(p, dtype=torch.uint8),
            "qmap1": self._qmaps[0],
            "qmap2": self._qmaps[1],
            "absmax1": torch.zeros(blocks, device=p.device),
            "absmax2": torch.zeros(blocks, device=p.device),
        }

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


# --------------------------------------------------------------------------- bytes


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes([v for state in optimizer.state.values() for v in state.values()])


def storage_bytes(values: list[Any]) -> int:
    """Bytes of the distinct storages behind ``values`` (views and shared storages once)."""
    seen: dict[int, int] = {}
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def steady_peak(peaks: dict[str, tuple[int, dict[str, int]]], states: int) -> tuple[str, int, dict[str, int]]:
    """The step's peak in a long run: phases before the first optimizer step ran without the
    optimizer states it created; every later step runs them with the states resident."""
    best: tuple[str, int, dict[str, int]] | None = None
    for phase, (total, categories) in peaks.items():
        categories = dict(categories)
        # setup (the models as built) and precompute come before the optimizer has states
        if not phase.startswith(("optimizer step", "precompute", "setup")):
            categories["optimizer"] += states
            total += states
        if best is None or total > best[1]:
            best = (phase, total, categories)
    if best is None or sum(best[2].values()) != best[1]:
        raise RuntimeError("memory tracker lost count: categories do not add up to the total")
    return best
