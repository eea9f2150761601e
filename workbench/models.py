"""The only place that resolves and loads models.

A *base* is what the user names as the teacher:

- ``toy``: the tiny SDXL-topology pipeline shipped in ``workbench/assets/toy-sdxl`` (default);
- ``sdxl-base`` (and ``sd15-base``, ``sd21-base``): built-in UNet configs, no weights,
  for planning and FLOP/latency estimates on the meta device;
- a local diffusers folder: a pipeline (``model_index.json`` + ``unet/``) or a UNet folder;
- a hub id such as ``stabilityai/stable-diffusion-xl-base-1.0`` (needs network access).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from workbench.catalog import meta_unet
from workbench.errors import WorkbenchError
from workbench.libraries import import_pipelines, load

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_DIR = PACKAGE_DIR / "assets" / "toy-sdxl"
CONFIG_DIR = PACKAGE_DIR / "configs"
BUILTIN_CONFIGS = {
    "sdxl-base": "sdxl-base-unet.json",
    "sd15-base": "sd15-unet.json",
    "sd21-base": "sd21-unet.json",
}
DEFAULT_BASE = "toy"
# Classifier-free guidance scales a base samples with unless told otherwise. SDXL's usual 5;
# the toy teacher (v-prediction, zero terminal SNR) follows its prompts best at 2: full-prompt
# accuracy on 243 held-out samples was 0.93 / 0.955 / 0.963 / 0.947 / 0.942 / 0.905 / 0.815 /
# 0.679 at guidance 1 / 1.5 / 2 / 2.5 / 3 / 4 / 7.5 / 10 (stronger guidance blurs small shapes).
DEFAULT_GUIDANCE = 5.0
TOY_GUIDANCE = 2.0
UNET_KEYS = ("down_block_types", "up_block_types", "block_out_channels")  # what a config must name
# What loading a damaged folder raises: missing or unreadable files, configs that do not match the
# weights, truncated safetensors. Each becomes one line naming the folder.
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Base:
    """A resolved teacher: where it lives and what it is."""

    name: str
    kind: str  # "toy" | "builtin" | "pipeline" | "unet" | "hub"
    location: str  # folder path, hub id, or config file
    unet_config: dict[str, Any]
    vae_scale_factor: int

    @property
    def has_weights(self) -> bool:
        return self.kind != "builtin"

    @property
    def has_pipeline(self) -> bool:
        return self.kind in ("toy", "pipeline", "hub")

    @property
    def guidance(self) -> float:
        """The guidance scale this base samples with by default."""
        return TOY_GUIDANCE if self.kind == "toy" else DEFAULT_GUIDANCE


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub id (``org/name``), whatever is on disk."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.startswith((".", "/", "~"))


def resolve_base(name: str | None = None) -> Base:
    """Resolve a base name to its UNet config without loading any weights."""
    name = (name or DEFAULT_BASE).strip()
    return _resolve_cached(name)


@lru_cache(maxsize=16)
def _resolve_cached(name: str) -> Base:
    if name == "toy":
        return _local(TOY_DIR, name="toy", kind="toy")
    if name in BUILTIN_CONFIGS:
        path = CONFIG_DIR / BUILTIN_CONFIGS[name]
        return Base(name, "builtin", str(path), _read_json(path), 8)
    path = Path(name).expanduser()
    if path.exists():
        return _local(path, name=name)
    if is_hub_id(name):
        return _hub(name)
    raise WorkbenchError(
        f"base {name!r} is not a built-in name, an existing folder, or a hub id; use toy, "
        f"{', '.join(BUILTIN_CONFIGS)}, a local diffusers folder (pipeline or UNet), or a hub "
        "id like stabilityai/stable-diffusion-xl-base-1.0"
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A config file of a model folder: a JSON object, or a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorkbenchError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(
            f"{path} holds a JSON {type(data).__name__}, not the object a diffusers config is"
        )
    return data


def _unet_config(path: Path) -> dict[str, Any]:
    """A UNet's config.json, with the fields every UNet2DConditionModel config names."""
    config = _read_json(path)
    for key in UNET_KEYS:
        if not isinstance(config.get(key), list) or not config[key]:
            raise WorkbenchError(
                f"{path} is not a complete UNet2DConditionModel config: {key!r} must be a non-empty list, "
                f"got {config.get(key)!r}"
            )
    return config


def _vae_factor(pipeline_dir: Path) -> int:
    vae = pipeline_dir / "vae" / "config.json"
    if not vae.exists():
        return 8
    return 2 ** (len(_read_json(vae).get("block_out_channels", [0] * 4)) - 1)


def _local(path: Path, name: str, kind: str | None = None) -> Base:
    if not path.is_dir():
        raise WorkbenchError(f"base {name!r} is a file; give a diffusers folder (pipeline or UNet)")
    if (path / "model_index.json").exists():
        _read_json(path / "model_index.json")
        config_path = path / "unet" / "config.json"
        if not config_path.exists():
            raise WorkbenchError(f"pipeline folder {str(path)!r} has no unet/config.json")
        return Base(name, kind or "pipeline", str(path), _unet_config(config_path), _vae_factor(path))
    if (path / "config.json").exists():
        config = _read_json(path / "config.json")
        if config.get("_class_name") != "UNet2DConditionModel":
            raise WorkbenchError(
                f"{str(path)!r} holds a {config.get('_class_name')!r}, not a UNet2DConditionModel"
            )
        return Base(name, kind or "unet", str(path), _unet_config(path / "config.json"), 8)
    if kind == "toy":
        raise WorkbenchError(f"the embedded toy teacher is missing from {path}; reinstall the project")
    raise WorkbenchError(
        f"{str(path)!r} is not a diffusers folder: expected model_index.json (a pipeline) or "
        "config.json (a UNet)"
    )


def _hub(repo_id: str) -> Base:
    (UNet2DConditionModel,) = load("diffusers", "UNet2DConditionModel")

    try:
        config = UNet2DConditionModel.load_config(repo_id, subfolder="unet")
    except Exception as err:  # hub errors come in many types; all mean "could not fetch"
        raise WorkbenchError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}); check "
            "the id, your network and HF_HUB_OFFLINE, or give a local folder"
        ) from None
    return Base(repo_id, "hub", repo_id, dict(config), 8)


def _unet_location(base: Base) -> tuple[str, str | None]:
    if base.kind in ("toy", "pipeline", "hub"):
        return base.location, "unet"
    return base.location, None


def load_unet(base: Base | str, device: str = "cpu", dtype=None):
    """The base's UNet with its weights; a clear error for config-only bases."""
    import torch

    (UNet2DConditionModel,) = load("diffusers", "UNet2DConditionModel")

    base = resolve_base(base) if isinstance(base, str) else base
    if not base.has_weights:
        raise WorkbenchError(
            f"base {base.name!r} is a built-in config without weights: it can be planned and "
            "measured, not exported or sampled; give a local folder or hub id of the real model"
        )
    location, subfolder = _unet_location(base)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            location, subfolder=subfolder, dtype=dtype or torch.float32
        )
    except LOAD_ERRORS as err:  # missing/corrupt files, or a hub fetch that failed
        raise WorkbenchError(_load_failed(base, "UNet", err)) from None
    return unet.to(device).eval()


def _load_failed(base: Base, what: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    hint = (
        "check the id, your network and HF_HUB_OFFLINE"
        if base.kind == "hub"
        else "check that the folder holds a complete diffusers save (config and weights)"
    )
    return f"could not load the {what} of {base.name!r}: {first}; {hint}"


def load_pipeline(base: Base | str = DEFAULT_BASE, device: str = "cpu", dtype=None, unet: bool = True):
    """A stock diffusers pipeline for the base (SDXL family or SD 1.x/2.x). ``unet=False``: its
    UNet is left unread (``pipe.unet`` is None), for those who put a student in its place."""
    import torch

    import_pipelines()
    (DiffusionPipeline,) = load("diffusers", "DiffusionPipeline")

    base = resolve_base(base) if isinstance(base, str) else base
    if not base.has_pipeline:
        raise WorkbenchError(
            f"base {base.name!r} has no full pipeline (text encoders, VAE); sampling needs a "
            "pipeline folder or hub id"
        )
    try:
        skip = {} if unet else {"unet": None}  # diffusers loads no component passed as None
        pipe = DiffusionPipeline.from_pretrained(base.location, dtype=dtype or torch.float32, **skip)
    except LOAD_ERRORS as err:
        raise WorkbenchError(_load_failed(base, "pipeline", err)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def freeze_pipeline(pipe):
    """The pipeline's models in eval mode without gradients (a teacher: it never trains)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


def as_teacher(unet, device, dtype):
    """``unet`` as a teacher: eval mode, no gradients, on ``device`` in ``dtype``. Another dtype
    gives a cast copy and leaves ``unet`` in its own: the pipeline it may belong to keeps
    sampling (its text encoders and VAE are in that dtype; a bf16 UNet among fp32 encoders
    cannot run the pipeline)."""

    unet = unet.to(device).eval().requires_grad_(False)
    if unet.dtype == dtype:
        return unet
    # built on the meta device and given cast tensors: no second full-precision copy
    teacher = meta_unet(dict(unet.config))
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in unet.state_dict().items()}
    teacher.load_state_dict(state, assign=True)
    return teacher.eval().requires_grad_(False)


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ENCODERS = ("text_encoder", "text_encoder_2", "vae")  # what encodes the data and decodes sample grids
# A part smaller than this stays in a CPU run's memory when set aside: reading it again from
# disk for every sample grid costs more time than the memory it frees is worth (the toy's
# parts: 2-31 MB; SDXL's: 0.3-9.6 GiB).
DROP_MIN_BYTES = 256 * 2**20


def _device(module):
    return next(iter(module.parameters()), None).device


def park(module) -> None:
    """``module`` off the accelerator: it waits on the CPU (nothing moves on a CPU run)."""
    import torch

    if module is not None and _device(module).type != "cpu":
        module.to("cpu")
        torch.cuda.empty_cache()  # give the freed blocks back, not only to this process's cache


class TeacherPipeline:
    """A run's teacher pipeline, and where its parts wait while the run does not need them.

    Beside an accelerator a part set aside waits on the CPU (``park``). On a CPU run parking
    would leave it where it is, taking the same memory, so it leaves memory altogether (its
    weights go to the meta device) and the base's files bring it back when it is needed
    again: the text encoders and VAE once the training data is cached (back for sample
    grids), the teacher's UNet once its targets are on disk or a cast copy teaches (back for
    the next stage that builds from it)."""

    def __init__(self, pipe, base: Base, device, min_bytes: int = DROP_MIN_BYTES) -> None:
        self.pipe, self.base, self.device, self.min_bytes = pipe, base, device, min_bytes
        self.away: dict[str, Any] = {}  # part -> its dtype, for the parts a CPU run let go

    def drops(self, name: str) -> bool:
        """Whether setting ``name`` aside takes it out of memory (a CPU run, a part loaded from
        files and large enough that reading it again is worth the memory it frees)."""
        module = getattr(self.pipe, name, None)
        if module is None or not self.on_cpu() or not self.base.has_weights:
            return False
        return module_bytes(module) >= self.min_bytes

    def kind(self) -> str:  # the run's device type: cpu, cuda, ...
        return getattr(self.device, "type", str(self.device).split(":")[0])

    def on_cpu(self) -> bool:
        return self.kind() == "cpu"

    def set_aside(self, *names: str) -> None:
        dropped = False
        for name in names:
            module = getattr(self.pipe, name, None)
            if module is None or name in self.away:
                continue
            if not self.drops(name):
                park(module)  # beside an accelerator; on the CPU, where it is
                continue
            self.away[name] = module.dtype
            module.to("meta")  # the weights leave memory; the module keeps its config for the pipeline
            dropped = True
        if dropped:
            give_back_memory()

    def bring_back(self, *names: str):
        """The parts named (every part let go, by default) back in memory, from the base's files."""
        for name in names or tuple(self.away):
            if name in self.away:
                part = load_part(self.base, name, self.away.pop(name))
                setattr(self.pipe, name, part.requires_grad_(False).eval())
        return self.pipe

    def for_student(self) -> tuple[str, ...]:
        """The parts a student's sampling needs: the text encoders and VAE; beside an
        accelerator the teacher's UNet too (sampling puts the student where it is)."""
        return ENCODERS if self.on_cpu() else PIPELINE_PARTS

    @contextlib.contextmanager
    def using(self, *names: str):
        """The parts named on the run's device inside the block; those that were away (set
        aside) go back after it, the others stay where they were."""
        present = [n for n in names if getattr(self.pipe, n, None) is not None]
        away = [n for n in present if n in self.away or _device(getattr(self.pipe, n)).type != self.kind()]
        self.bring_back(*away)
        for name in away:
            getattr(self.pipe, name).to(self.device)
        try:
            yield self.pipe
        finally:
            self.set_aside(*away)


def module_bytes(module) -> int:
    """Bytes of a module's parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def give_back_memory() -> None:
    """Return freed CPU memory to the operating system. glibc keeps freed blocks below its mmap
    threshold (up to 32 MiB: most weight tensors) in the process's heap for reuse: without
    this, a model that left memory still counts in the process's resident set and is not free
    for other processes."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_part(base: Base, name: str, dtype):
    """One part of the base's pipeline (``unet``, ``vae``, a text encoder) from its files, of
    the class its ``model_index.json`` names."""
    if name == "unet":
        return load_unet(base, dtype=dtype)
    import_pipelines()
    (DiffusionPipeline,) = load("diffusers", "DiffusionPipeline")
    try:
        library, class_name = DiffusionPipeline.load_config(base.location)[name]
        (cls,) = load(library, class_name)
        return cls.from_pretrained(base.location, subfolder=name, dtype=dtype)
    except LOAD_ERRORS as err:
        raise WorkbenchError(_load_failed(base, name, err)) from None


def check_unet_folder(folder: str | Path) -> Path:
    """The folder as a path, if it looks like a saved UNet; cheap, so commands can reject
    a bad ``--unet`` before loading any model."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise WorkbenchError(
            f"--unet {str(path)!r} is not a UNet folder (no config.json); give a folder written "
            "by `python -m workbench export` or diffusers' save_pretrained"
        )
    _unet_config(path / "config.json")
    return path


def load_unet_folder(folder: str | Path, dtype=None):
    """The UNet saved in ``folder`` (a student's); a damaged folder is a one-line error."""
    import torch

    (UNet2DConditionModel,) = load("diffusers", "UNet2DConditionModel")
    try:
        return UNet2DConditionModel.from_pretrained(folder, dtype=dtype or torch.float32)
    except LOAD_ERRORS as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise WorkbenchError(
            f"could not load the UNet in {str(folder)!r}: {first}; check that the folder holds a complete "
            "diffusers save (config and weights)"
        ) from None
