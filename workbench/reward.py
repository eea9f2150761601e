"""Latent reward models: differentiable scores of a one-step prediction, for reward-guided
latent consistency distillation (RG-LCD, Li et al. 2024: an LCD stage that also climbs a
reward of the student's one-step prediction of the clean latents).

A reward is any callable ``reward(latents, cond) -> (B,)``, differentiable w.r.t. ``latents``:

- ``latents`` (B, C, h, w): clean latents as the UNet sees them (VAE latents times its
  scaling factor), here the student's consistency output;
- ``cond``: the prompt's text inputs as the UNet takes them (``encoder_hidden_states``
  (B, L, D), and for SDXL-family bases ``added_cond_kwargs["text_embeds"]`` (B, P) pooled).

``load_reward(spec, base)`` reads one of three forms: a reward folder written by
``save_reward`` (config.json + model.safetensors); ``toy``, the shipped latent proxy of the toy
checker (``workbench/assets/toy-sdxl/reward``, trained by ``python -m workbench.toy.reward``);
or the user's own scorer, ``path/to/file.py:name`` or ``package.module:name``, naming a
scorer or a factory that takes no arguments and returns one. ``check_reward_spec`` checks a
spec's form (a folder's config against the base; a user's file or module imported and its
name found, a factory not yet called) without loading any weights.

``LatentRewardModel`` is the workbench's own: a small conv net over the latents (with
coordinate channels, so position is easy to read), FiLM-conditioned at every layer on the
text (the pooled vector and an attention pooling of the token embeddings), with one logit per
judged attribute. Its score is ``sum(log sigmoid(logits))``: the log-probability that every
attribute is judged right, at most 0.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.files import atomic_write, write_json_atomic
from workbench.models import TOY_DIR

SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOY_SPEC = "toy"
FORMS = (
    "a reward folder (config.json + model.safetensors), toy (the shipped toy proxy), or a "
    "differentiable scorer (latents, cond) -> (B,) as path/to/file.py:name or package.module:name"
)

Reward = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


def toy_reward_dir() -> Path:
    return TOY_DIR / "reward"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RewardConfig:
    """The shape of a ``LatentRewardModel``: what it reads and how wide it is."""

    latent_channels: int  # C of the latents (the base UNet's in_channels)
    token_dim: int  # D of encoder_hidden_states (the UNet's cross_attention_dim)
    pooled_dim: int = 0  # P of added_cond_kwargs["text_embeds"]; 0: not used (SD 1.x / 2.x)
    heads: tuple[str, ...] = ("score",)  # one logit each (the toy's: its checker's attributes)
    width: int = 32
    queries: int = 4  # attention-pooling queries over the tokens

    def __post_init__(self) -> None:
        for name in ("latent_channels", "token_dim", "width", "queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WorkbenchError(f"reward config: {name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.pooled_dim, int) or self.pooled_dim < 0:
            raise WorkbenchError(
                f"reward config: pooled_dim must be a whole number >= 0, got {self.pooled_dim!r}"
            )
        if not self.heads or not all(isinstance(h, str) and h for h in self.heads):
            raise WorkbenchError(f"reward config: heads must be a list of names, got {self.heads!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self), "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str) -> RewardConfig:
        known = {f.name for f in dataclasses.fields(cls)} | {"schema_version"}
        unknown = sorted(set(data) - known)
        if data.get("schema_version") != SCHEMA_VERSION or unknown:
            raise WorkbenchError(
                f"{origin}: not a reward config of schema {SCHEMA_VERSION} (schema "
                f"{data.get('schema_version')!r}, unknown keys {unknown})"
            )
        fields = {k: v for k, v in data.items() if k != "schema_version"}
        try:
            return cls(**(fields | {"heads": tuple(fields.get("heads", ("score",)))}))
        except TypeError as err:
            raise WorkbenchError(f"{origin}: {err}") from None


class FiLMConv(nn.Module):
    """conv -> GroupNorm -> scale and shift from the text -> SiLU."""

    def __init__(self, cin: int, cout: int, text: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(min(8, cout), cout)
        self.film = nn.Linear(text, 2 * cout)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(text)[:, :, None, None].chunk(2, dim=1)
        return F.silu(self.norm(self.conv(x)) * (1 + scale) + shift)


class LatentRewardModel(nn.Module):
    """A score per sample of (latents, text inputs): see the module's docstring."""

    def __init__(self, config: RewardConfig) -> None:
        super().__init__()
        self.config, w = config, config.width
        self.queries = nn.Parameter(torch.randn(config.queries, config.token_dim) / config.token_dim**0.5)
        text_in = config.queries * config.token_dim + config.pooled_dim
        self.text = nn.Sequential(nn.Linear(text_in, 2 * w), nn.SiLU(), nn.Linear(2 * w, 2 * w))
        self.layers = nn.ModuleList([
            FiLMConv(config.latent_channels + 2, w, 2 * w, 1),
            FiLMConv(w, w, 2 * w, 2),
            FiLMConv(w, 2 * w, 2 * w, 2),
        ])  # fmt: skip
        self.head = nn.Sequential(nn.Linear(6 * w, 2 * w), nn.SiLU(), nn.Linear(2 * w, len(config.heads)))

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def text_features(self, cond: dict[str, Any]) -> torch.Tensor:
        """(B, 2 width): attention-pooled tokens (B, L, D), with the pooled vector (B, P)."""
        tokens = cond["encoder_hidden_states"].float()
        weights = torch.softmax(tokens @ self.queries.T / tokens.shape[-1] ** 0.5, dim=1)  # (B, L, Q)
        parts = [(weights.transpose(1, 2) @ tokens).flatten(1)]  # (B, Q * D)
        if self.config.pooled_dim:
            parts.append(cond["added_cond_kwargs"]["text_embeds"].float())
        return self.text(torch.cat(parts, dim=1))

    def logits(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """(B, heads): one logit per judged attribute (positive: judged right)."""
        b, _, h, w = latents.shape
        ys = torch.linspace(-1, 1, h, device=latents.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=latents.device).view(1, 1, 1, w).expand(b, 1, h, w)
        x, text = torch.cat([latents.float(), ys, xs], dim=1), self.text_features(cond)
        for layer in self.layers:
            x = layer(x, text)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)  # (B, 4 width)
        return self.head(torch.cat([pooled, text], dim=1))

    def forward(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """(B,) the log-probability that every attribute is judged right (<= 0)."""
        return F.logsigmoid(self.logits(latents, cond)).sum(dim=1)


def save_reward(model: LatentRewardModel, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """config.json and model.safetensors in ``folder`` (created); ``extra`` files as JSON."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / CONFIG_FILE, model.config.to_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes its file private
    for name, value in (extra or {}).items():
        write_json_atomic(folder / name, value)
    return folder


def read_reward_config(folder: str | Path) -> RewardConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WorkbenchError(
            f"reward folder {str(folder)!r}: cannot read {CONFIG_FILE} ({err}); give {FORMS}"
        ) from None
    return RewardConfig.from_dict(data, f"reward folder {str(folder)!r}")


def load_reward_folder(folder: str | Path) -> LatentRewardModel:
    from safetensors.torch import load_file

    model = LatentRewardModel(read_reward_config(folder))
    try:
        model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    except (OSError, RuntimeError) as err:
        raise WorkbenchError(f"reward folder {str(folder)!r}: {WEIGHTS_FILE} does not load ({err})") from None
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class RewardSpec:
    """A parsed ``--lcd-reward``: ``kind`` folder | toy | file | module."""

    kind: str
    location: str  # the folder, the .py file or the module
    name: str = ""  # the scorer's (or factory's) name in the file or module


def public_name(spec: str) -> str:
    """What a model card may show of a reward spec: no local paths (nothing is read)."""
    spec = spec.strip()
    if spec == TOY_SPEC:
        return "the toy checker's latent proxy (toy)"
    where, colon, name = spec.rpartition(":")
    if colon and name.isidentifier() and where.endswith(".py"):
        return f"`{Path(where).name}:{name}`"
    if colon and name.isidentifier() and all(part.isidentifier() for part in where.split(".")):
        return f"`{spec}`"
    return f"the reward model `{Path(spec).name}`"


def parse_reward_spec(spec: Any) -> RewardSpec:
    """The form of ``spec`` (nothing imported, no weights read); a one-line error naming the
    valid forms if it is none of them."""
    if not isinstance(spec, str) or not spec.strip():
        raise WorkbenchError(f"reward {spec!r}: give {FORMS}")
    spec = spec.strip()
    if spec == TOY_SPEC:
        return RewardSpec("toy", str(toy_reward_dir()))
    if Path(spec).expanduser().is_dir():
        return RewardSpec("folder", str(Path(spec).expanduser()))
    where, colon, name = spec.rpartition(":")
    if colon and name.isidentifier() and where:
        if where.endswith(".py"):
            if not Path(where).expanduser().is_file():
                raise WorkbenchError(f"reward {spec!r}: no file {where!r}; give {FORMS}")
            return RewardSpec("file", str(Path(where).expanduser()), name)
        if all(part.isidentifier() for part in where.split(".")):
            if _find_module(where) is None:
                raise WorkbenchError(f"reward {spec!r}: no module {where!r} can be imported; give {FORMS}")
            return RewardSpec("module", where, name)
    raise WorkbenchError(f"reward {spec!r} is not a folder and not of a known form; give {FORMS}")


def _find_module(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that is missing or not a package
        return None


def check_reward_spec(spec: Any, base=None) -> RewardSpec:
    """``parse_reward_spec``, and a reward folder's config against the base (config files only,
    no weights), or the user's file or module imported and its object found (a factory is not
    called yet: it may load weights)."""
    parsed = parse_reward_spec(spec)
    if parsed.kind in ("folder", "toy"):
        config = read_reward_config(parsed.location)
        if base is not None:
            check_against_base(config, base.unet_config, spec)
    else:
        _user_object(parsed, spec)
    return parsed


def base_dims(unet_config: dict[str, Any]) -> dict[str, int]:
    """What a reward reads of a base: latent channels, token width and pooled width (0: none)."""
    pooled = 0
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = (
            unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        )
    return {
        "latent_channels": unet_config.get("in_channels", 4),
        "token_dim": unet_config.get("cross_attention_dim"),
        "pooled_dim": pooled,
    }


def check_against_base(config: RewardConfig, unet_config: dict[str, Any], spec: str) -> None:
    dims = base_dims(unet_config)
    what = {
        "latent_channels": "latent channels",
        "token_dim": "text token width",
        "pooled_dim": "pooled text width",
    }
    for key, text in what.items():
        mine = getattr(config, key)
        if key == "pooled_dim" and mine == 0:
            continue  # it does not read the pooled vector
        if mine != dims[key]:
            raise WorkbenchError(
                f"reward {spec!r} reads {text} {mine} but the base's UNet has {dims[key]}; "
                "use a reward made for this base"
            )


# --------------------------------------------------------------------------- loading


def load_reward(spec: str, base=None, device: Any = "cpu") -> Reward:
    """The reward ``spec`` names, frozen and in eval mode on ``device`` (see the module's
    docstring for the forms); checked against ``base`` (a ``models.Base``) where it can be."""
    parsed = check_reward_spec(spec, base)
    if parsed.kind in ("folder", "toy"):
        reward: Any = load_reward_folder(parsed.location)
    else:
        reward = _user_scorer(parsed, spec)
    channels = getattr(reward, "latent_channels", None)
    if base is not None and isinstance(channels, int):
        expected = base_dims(base.unet_config)["latent_channels"]
        if channels != expected:
            raise WorkbenchError(
                f"reward {spec!r} reads {channels} latent channels but the base's UNet has {expected}"
            )
    if isinstance(reward, nn.Module):
        reward = reward.to(device).eval().requires_grad_(False)
    return reward


def _user_object(parsed: RewardSpec, spec: str) -> Any:
    """The named callable of the user's file or module (imported once per process)."""
    module = _import_file(parsed.location) if parsed.kind == "file" else _import_module(parsed.location, spec)
    obj = getattr(module, parsed.name, None)
    if obj is None:
        raise WorkbenchError(f"reward {spec!r}: {parsed.location} has no {parsed.name!r}")
    if not callable(obj):
        raise WorkbenchError(f"reward {spec!r}: {parsed.name!r} is not callable; give {FORMS}")
    return obj


def _user_scorer(parsed: RewardSpec, spec: str) -> Reward:
    """The user's scorer; a factory (a class, or no required arguments) is called once for it."""
    obj = _user_object(parsed, spec)
    if inspect.isclass(obj) or _required_args(obj) == 0:  # a factory (a class: its instance)
        try:
            obj = obj()
        except Exception as err:  # the user's code: any error is theirs, reported in one line
            raise WorkbenchError(
                f"reward {spec!r}: {parsed.name}() fails: {type(err).__name__}: {err}"
            ) from None
        if not callable(obj):
            raise WorkbenchError(
                f"reward {spec!r}: the factory {parsed.name!r} returned a {type(obj).__name__}, not a scorer"
            )
    if _required_args(obj) not in (2, None):
        raise WorkbenchError(
            f"reward {spec!r}: a scorer takes (latents, cond); {parsed.name!r} takes {_required_args(obj)} arguments"
        )
    return obj


def _required_args(obj: Any) -> int | None:
    """How many positional arguments ``obj`` requires (None: cannot tell, or any number)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is p.empty for p in params)


def _import_file(path: str):
    name = f"workbench_user_reward_{abs(hash(str(Path(path).resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    try:
        found.loader.exec_module(module)
    except Exception as err:  # the user's code: any error is theirs, reported in one line
        del sys.modules[name]
        raise WorkbenchError(f"reward file {path!r} fails to import: {type(err).__name__}: {err}") from None
    return module


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except Exception as err:  # the user's code: any error is theirs, reported in one line
        raise WorkbenchError(
            f"reward {spec!r}: module {name!r} fails to import: {type(err).__name__}: {err}"
        ) from None
