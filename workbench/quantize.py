"""Quantise a student after pruning and distillation, and see what it costs before shipping it.

A student (a plan's, a trained run's, or an earlier export: ``export.Student``) is quantised
with torchao through diffusers' own ``TorchAoConfig``, so a stock
``UNet2DConditionModel.from_pretrained(folder)`` loads the exported folder: the quantisation
config travels in ``config.json`` and the packed weights in ``diffusion_pytorch_model.safetensors``
(torchao's safetensors layout). Schemes (``SCHEMES``):

- ``int8``: int8 weights per output channel, activations in the model's dtype (weight-only);
- ``int8-dynamic``: int8 weights, and activations quantised to int8 per token at run time;
- ``int4``: int4 weights in groups of ``INT4_GROUP`` (torchao's tinygemm layout, bf16 compute);
- ``fp8``: float8 (e4m3) weights per output channel.

What gets quantised: the weights of ``nn.Linear`` layers only (diffusers' torchao backend
leaves every ``Conv2d``, norm, embedding table and bias in the model dtype). Removing
transformer blocks removes mostly Linear weights, so a pruned student has a smaller share of
quantisable parameters than its teacher: ``param_share`` counts it on the meta device.

A scheme this machine cannot run is refused in one line before anything is written
(``check_scheme``): fp8 without a CUDA GPU of compute capability >= 8.9; int4 where torchao
has no kernel for the device (this torchao has none on CPU); a probe quantises a small
Linear on the device and runs it, so the refusal carries the library's own reason.

Cost before shipping (``compare``): weight bytes (fp32, fp16, quantised), CPU latency per UNet
forward of both models timed side by side (interleaved), and the quantised output's
difference from the unquantised student's on the same inputs. ``inference_memory`` gives the
peak device memory of sampling (the memory planner estimates training only): the UNet's
weights, its activations for one classifier-free-guided forward (batch 2) measured on fake
tensors, and the text encoders and VAE in fp16, with a verdict per GPU size; the VAE decode's
own activations are not counted.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from workbench.catalog import meta_unet
from workbench.cost import dummy_inputs, latent_size
from workbench.dtypes import torch_dtypes
from workbench.errors import WorkbenchError
from workbench.export import Student, check_out, place_folder
from workbench.memory import CUDA_CONTEXT_BYTES, FRAGMENTATION, GIB, encoder_bytes
from workbench.modelcard import model_card, quantization_section
from workbench.models import Base
from workbench.surgery import save_plan_files

LIBRARY = "torchao"
INT4_GROUP = 128  # torchao's default group size for int4 weight-only
FP8_CAPABILITY = (8, 9)  # float8 matmuls: Ada, Hopper and later
INFERENCE_GPU_SIZES_GB = (4, 6, 8, 12, 16, 24)
DTYPES = torch_dtypes()  # the one table: workbench.dtypes
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Scheme:
    """One quantisation scheme: its torchao config class and the compute dtypes it allows."""

    name: str
    config_class: str  # in torchao.quantization
    dtypes: tuple[str, ...]  # compute dtypes (of the layers left unquantised and of activations)
    help: str


SCHEMES = {
    "int8": Scheme(
        "int8", "Int8WeightOnlyConfig", ("fp32", "fp16", "bf16"),
        "int8 weights per output channel; activations in the model dtype",
    ),
    "int8-dynamic": Scheme(
        "int8-dynamic", "Int8DynamicActivationInt8WeightConfig", ("fp32", "fp16", "bf16"),
        "int8 weights; activations quantised to int8 per token at run time (int8 matmuls)",
    ),
    "int4": Scheme(
        "int4", "Int4WeightOnlyConfig", ("bf16",),
        f"int4 weights in groups of {INT4_GROUP} (tinygemm layout; bf16 compute, CUDA kernels)",
    ),
    "fp8": Scheme(
        "fp8", "Float8WeightOnlyConfig", ("bf16", "fp16"),
        "float8 e4m3 weights per output channel (CUDA, compute capability >= 8.9)",
    ),
}  # fmt: skip


def library_version() -> str:
    try:
        return importlib.metadata.version(LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        raise WorkbenchError(
            "quantisation needs torchao, which is not installed; `pip install torchao==0.18.0` "
            "(the version requirements.txt pins)"
        ) from None


def default_dtype(scheme: str) -> str:
    """fp32 where the scheme allows it (CPU-safe), else the scheme's first dtype."""
    return SCHEMES[scheme].dtypes[0]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- refusals


def check_scheme(name: str, dtype: str | None = None, device: str | None = None) -> Scheme:
    """The scheme, if this machine can quantise with it and run it; else one line saying why."""
    if name not in SCHEMES:
        raise WorkbenchError(f"unknown quantisation {name!r}; choose one of {', '.join(SCHEMES)}")
    scheme = SCHEMES[name]
    dtype = dtype or default_dtype(name)
    if dtype not in scheme.dtypes:
        raise WorkbenchError(
            f"--quantize {name} computes in {' or '.join(scheme.dtypes)}, not {dtype}; pass --dtype "
            f"{scheme.dtypes[0]} (or leave --dtype out)"
        )
    version = library_version()
    device = device or default_device()
    _check_device(device)
    if name == "fp8":
        _check_fp8_device(device)
    _probe(scheme, dtype, device, version)
    return scheme


def _check_fp8_device(device: str) -> None:
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if not device.startswith("cuda") or capability is None or capability < FP8_CAPABILITY:
        found = f"compute capability {capability[0]}.{capability[1]}" if capability else "no CUDA GPU"
        raise WorkbenchError(
            f"--quantize fp8 is for CUDA GPUs with float8 matmuls (compute capability >= 8.9); this "
            f"machine has {found} (torch {torch.__version__}), where torchao would only turn the float8 "
            "weights back into floats at every step; choose int8"
        )


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu")


def _probe(scheme: Scheme, dtype: str, device: str, version: str) -> None:
    """Quantise a small Linear and run it: where torchao has no kernel, say so in one line."""
    layer = torch.nn.Sequential(torch.nn.Linear(2 * INT4_GROUP, 16)).to(device, DTYPES[dtype])
    try:
        torchao_quantize(layer, scheme.name)
        with torch.no_grad():
            layer(torch.zeros(1, 2 * INT4_GROUP, device=device, dtype=DTYPES[dtype]))
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WorkbenchError(
            f"--quantize {scheme.name}: torchao {version} has no kernel for it on {device} here "
            f"({type(err).__name__}: {reason}); quantise on a CUDA GPU or choose int8"
        ) from None


# --------------------------------------------------------------------------- torchao


def torchao_config(name: str):
    """The torchao config object of scheme ``name`` (what ``TorchAoConfig`` wraps)."""
    from torchao import quantization as q

    if name == "int4":
        return q.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
    return getattr(q, SCHEMES[name].config_class)()


def torchao_quantize(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """Quantise the Linear weights of ``module`` in place (as diffusers' backend does)."""
    from torchao.quantization import quantize_

    quantize_(module, torchao_config(name))
    return module


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns that integer quantisation wants bf16: fp32 and fp16 run fine here."""
    from diffusers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def quantize_unet(unet, scheme: str, dtype: str | None = None, device: str | None = None):
    """A quantised copy of ``unet``, made the way a client loads it: saved, then read back
    by ``from_pretrained`` with the scheme's ``TorchAoConfig`` (``unet`` is not changed)."""
    from diffusers import TorchAoConfig, UNet2DConditionModel

    dtype = dtype or default_dtype(scheme)
    device = device or default_device()
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp, _quiet_diffusers():
        unet.save_pretrained(tmp)
        quantized = UNet2DConditionModel.from_pretrained(
            tmp, quantization_config=TorchAoConfig(torchao_config(scheme)), dtype=DTYPES[dtype],
            **({"device_map": device} if device != "cpu" else {}),
        )  # fmt: skip
    return quantized.eval()


def load_quantized(folder: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """A quantised export, as its model card says to load it (stock diffusers)."""
    from diffusers import UNet2DConditionModel

    with _quiet_diffusers():
        unet = UNet2DConditionModel.from_pretrained(Path(folder), dtype=DTYPES[dtype])
    return unet.to(device).eval()


# --------------------------------------------------------------------------- bytes and shares


@dataclass(frozen=True)
class ParamShare:
    """Where a UNet's parameters are, and how many of them a scheme quantises."""

    total: int
    linear_weights: int  # weights of nn.Linear layers (what diffusers' torchao backend quantises)
    quantized: int  # the Linear weights the scheme takes (int4: in_features divisible by the group)
    conv: int  # Conv2d weights and biases (left in the model dtype)
    quantized_rows: int  # output channels of the quantised weights (one scale each)

    @property
    def share(self) -> float:
        return self.quantized / self.total if self.total else 0.0

    @property
    def conv_share(self) -> float:
        return self.conv / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "linear_weights": self.linear_weights, "quantized": self.quantized,
            "conv": self.conv, "share": round(self.share, 4), "conv_share": round(self.conv_share, 4),
        }  # fmt: skip


def quantizable(layer: torch.nn.Linear, scheme: str) -> bool:
    """Whether ``scheme`` quantises this Linear (torchao skips int4 weights whose input width
    is not a multiple of the group)."""
    return scheme != "int4" or layer.in_features % INT4_GROUP == 0


def param_share(config: dict[str, Any], scheme: str = "int8") -> ParamShare:
    """Parameter counts of the UNet of ``config`` (meta device: no memory, no weights)."""
    model = meta_unet(config)
    total = sum(p.numel() for p in model.parameters())
    linear = quantized = rows = conv = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            if quantizable(module, scheme):
                quantized += module.weight.numel()
                rows += module.out_features
        elif isinstance(module, torch.nn.Conv2d):
            conv += sum(p.numel() for p in module.parameters())
    return ParamShare(total, linear, quantized, conv, rows)


def weight_bytes(config: dict[str, Any], scheme: str | None = None, dtype: str = "fp16") -> int:
    """Bytes of the UNet's weights: every parameter in ``dtype``, or with ``scheme`` its
    quantised Linear weights packed (int8 / fp8: 1 byte each plus an fp32 scale per output
    channel, and int8 an int8 zero point; int4: half a byte plus a bf16 scale and zero per
    group) and the rest in ``dtype``."""
    share = param_share(config, scheme or "int8")
    if scheme is None:
        return share.total * _DTYPE_BYTES[dtype]
    rest = (share.total - share.quantized) * _DTYPE_BYTES[dtype]
    if scheme == "int4":
        return rest + share.quantized // 2 + (share.quantized // INT4_GROUP) * 4
    per_row = 5 if scheme.startswith("int8") else 4
    return rest + share.quantized + share.quantized_rows * per_row


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor is counted by its inner tensors (data, scales)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.nn.Parameter:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    if type(tensor) is torch.nn.Parameter and hasattr(tensor.data, "__tensor_flatten__"):
        return tensor_bytes(tensor.data)
    return tensor.numel() * tensor.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as they are held (quantised ones packed)."""
    return sum(tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))


def quantized_count(model: torch.nn.Module) -> int:
    """Parameters of ``model`` held quantised (torchao tensors)."""
    from torchao.utils import TorchAOBaseTensor

    return sum(p.numel() for p in model.parameters() if isinstance(p.data, TorchAOBaseTensor))


# --------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Cost:
    """The quantised student beside the unquantised one, measured in one run."""

    scheme: str
    fp32_bytes: int
    fp16_bytes: int
    quantized_bytes: int
    share: float  # of the student's parameters held quantised
    latency_s: dict[str, float]  # median seconds per UNet forward: "fp32", "<scheme>"
    latency_spread: dict[str, float]  # (max - min) / median of the repeats
    output_rel_diff: float  # ||q - f|| / ||f|| of the UNet outputs on the same inputs
    output_max_diff: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.latency_s["fp32"] / self.latency_s[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme, "fp32_bytes": self.fp32_bytes, "fp16_bytes": self.fp16_bytes,
            "quantized_bytes": self.quantized_bytes, "share": round(self.share, 4),
            "latency_s": self.latency_s, "latency_spread": self.latency_spread,
            "speedup": round(self.speedup, 3), "output_rel_diff": self.output_rel_diff,
            "output_max_diff": self.output_max_diff, "settings": self.settings,
        }  # fmt: skip


def side_by_side(models: dict[str, Any], inputs: dict[str, Any], repeats: int = 5) -> dict[str, list[float]]:
    """Seconds per forward of each model, interleaved (a, b, a, b...) after one warm-up each,
    so that load on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(**inputs, return_dict=False)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs, return_dict=False)
                times[name].append(time.perf_counter() - start)
    return times


def compare(
    unet, quantized, scheme: str, resolution_latent: int | None = None, batch: int = 1, repeats: int = 5
) -> Cost:
    """Bytes, CPU latency and output difference of ``quantized`` against the fp32 ``unet``."""
    config = dict(unet.config)
    latent = resolution_latent or config["sample_size"]
    torch.manual_seed(0)
    inputs = dummy_inputs(config, latent, batch)
    with torch.no_grad():
        ref = unet(**inputs, return_dict=False)[0]
        out = quantized(**inputs, return_dict=False)[0].float()
    times = side_by_side({"fp32": unet, scheme: quantized}, inputs, repeats)
    total = sum(p.numel() for p in unet.parameters())
    return Cost(
        scheme=scheme, fp32_bytes=model_bytes(unet), fp16_bytes=total * 2,
        quantized_bytes=model_bytes(quantized), share=quantized_count(quantized) / total,
        latency_s={k: statistics.median(v) for k, v in times.items()},
        latency_spread={k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()},
        output_rel_diff=float((out - ref).norm() / ref.norm()), output_max_diff=float((out - ref).abs().max()),
        settings={"latent": latent, "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
                  "device": "cpu"},
    )  # fmt: skip


def cost_lines(cost: Cost) -> list[str]:
    """The cost in a few lines, for the CLI and the Export tab."""
    q, lat = cost.scheme, cost.latency_s
    return [
        f"weights: fp32 {cost.fp32_bytes / 1e6:,.2f} MB, fp16 {cost.fp16_bytes / 1e6:,.2f} MB, {q} "
        f"{cost.quantized_bytes / 1e6:,.2f} MB ({cost.share:.1%} of the parameters quantised)",
        f"CPU latency per UNet forward, side by side: fp32 {lat['fp32'] * 1e3:,.1f} ms, {q} "
        f"{lat[q] * 1e3:,.1f} ms ({cost.speedup:.2f}x; {cost.settings['repeats']} repeats each)",
        f"output vs the unquantised student: relative L2 {cost.output_rel_diff:.4f}, "
        f"max |diff| {cost.output_max_diff:.4f}",
    ]


# --------------------------------------------------------------------------- inference memory


class _ActivationPeak(TorchDispatchMode):
    """Peak bytes of the storages a forward creates (weights, registered first, not counted)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.live = {id(p.untyped_storage()): 0 for p in model.parameters()}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf.untyped_storage()) not in self.live:
                storage = leaf.untyped_storage()
                self.live[id(storage)] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, id(storage))
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def activation_bytes(config: dict[str, Any], latent: int, batch: int = 2, dtype: str = "fp16") -> int:
    """Peak activation bytes of one UNet forward in ``dtype`` (fake tensors: nothing allocated).
    Batch 2 is one classifier-free-guided step (prompt and empty prompt)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model, mode, cpu = meta_unet(config), FakeTensorMode(), torch.device("cpu")
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = FakeTensor(mode, torch.empty_like(p, dtype=DTYPES[dtype]), cpu)
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)
    with mode, torch.no_grad():
        inputs = dummy_inputs(config, latent, batch, "cpu", DTYPES[dtype])
        with _ActivationPeak(model) as tracker:
            model(**inputs, return_dict=False)
    return tracker.peak


@dataclass(frozen=True)
class InferenceMemory:
    """Peak device memory of sampling with a (quantised) student, by part, with verdicts."""

    scheme: str | None
    resolution: int
    unet_bytes: int
    activation_bytes: int
    encoder_bytes: int  # text encoders and VAE in fp16
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.unet_bytes + self.activation_bytes + self.encoder_bytes

    def needed(self) -> int:
        """With the CUDA context and the allocator's margin, as the training planner asks."""
        return int(self.total * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def verdicts(self, sizes_gb: tuple[int, ...] = INFERENCE_GPU_SIZES_GB) -> dict[int, str]:
        out = {}
        for gb in sizes_gb:
            fits = self.needed() <= gb * GIB
            out[gb] = "fits" if fits else "tight" if self.total + CUDA_CONTEXT_BYTES <= gb * GIB else "no"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme or "fp16", "resolution": self.resolution, "unet_bytes": self.unet_bytes,
            "activation_bytes": self.activation_bytes, "encoder_bytes": self.encoder_bytes,
            "total_gb": round(self.total / GIB, 3), "needed_gb": round(self.needed() / GIB, 3),
            "verdicts": {str(k): v for k, v in self.verdicts().items()}, "notes": list(self.notes),
        }  # fmt: skip


def inference_memory(
    config: dict[str, Any], base: Base, scheme: str | None = None, resolution: int = 1024,
    activations: int | None = None,
) -> InferenceMemory:  # fmt: skip
    """Sampling at ``resolution`` px in fp16 with the UNet of ``config`` quantised by ``scheme``
    (None: fp16). ``activations`` reuses a figure already measured for this config."""
    latent = latent_size(config, resolution, base.vae_scale_factor)
    acts = activation_bytes(config, latent) if activations is None else activations
    encoders, note = encoder_bytes(base)  # fp32 bytes
    notes = ("the VAE decode's activations are not counted (enable_vae_tiling bounds them)",)
    return InferenceMemory(
        scheme,
        resolution,
        weight_bytes(config, scheme, "fp16"),
        acts,
        encoders // 2,
        notes + ((note,) if note else ()),
    )


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class QuantizedExport:
    out: Path
    scheme: str
    dtype: str
    files: tuple[str, ...]
    share: float  # of the student's parameters held quantised
    weights_bytes: int  # of the safetensors file
    library: str


def export_quantized(
    student: Student, scheme: str, out: str | Path, dtype: str | None = None,
    device: str | None = None, evaluation: dict[str, Any] | None = None, quantized=None,
) -> QuantizedExport:  # fmt: skip
    """Write ``student`` quantised by ``scheme`` as a diffusers folder ``out`` (atomically), with
    ``plan.json``, ``layer_map.json`` and the model card (``evaluation``: the quantised student's
    figures). ``quantized`` is the student already quantised by ``quantize_unet``, if the caller
    has it. Refusals come before any write."""
    dtype = dtype or default_dtype(scheme)
    check_scheme(scheme, dtype, device)
    out = check_out(out)
    if quantized is None:
        quantized = quantize_unet(student.unet, scheme, dtype, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        quantized.save_pretrained(tmp)
        save_plan_files(student.spec, tmp)
        info = quantization_info(quantized, scheme, dtype, tmp)
        card = (
            model_card(student, "diffusers", dtype, evaluation=evaluation) + "\n" + quantization_section(info)
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files = place_folder(tmp, out, student)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantizedExport(out, scheme, dtype, files, info["share"], info["weights_bytes"], info["library"])


def quantization_info(quantized, scheme: str, dtype: str, folder: Path) -> dict[str, Any]:
    """What the model card says about the quantisation (plain data)."""
    total = sum(p.numel() for p in quantized.parameters())
    weights = folder / "diffusion_pytorch_model.safetensors"
    return {
        "scheme": scheme, "help": SCHEMES[scheme].help, "config_class": SCHEMES[scheme].config_class,
        "library": f"{LIBRARY} {library_version()}", "diffusers": importlib.metadata.version("diffusers"),
        "torch": torch.__version__.split("+")[0], "dtype": dtype, "share": quantized_count(quantized) / total,
        "weights_bytes": weights.stat().st_size if weights.is_file() else 0,
        "fp16_bytes": 2 * total, "cuda_only": scheme in ("int4", "fp8"),
    }  # fmt: skip


def read_quantization(folder: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` a diffusers folder carries, or None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
