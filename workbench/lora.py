"""Move a LoRA trained on the teacher onto a student, through the layer map.

A block-removed student keeps the teacher's module names only where nothing before them
was removed: SSD-1B's ``transformer_blocks.3`` inherited the teacher's block 5. Loaded by
name, a teacher LoRA's pair for block 3 lands on the student's block 3 (the wrong one) and
the pairs of removed modules are dropped with a warning. Here every pair is renamed to the
student module that inherited its teacher module, and the pairs of removed modules are
dropped and reported.

Reading goes through diffusers' and peft's own LoRA machinery: the file is loaded into an
empty-weight copy of the teacher (which also checks every pair's shape against the
teacher), and the pairs are read back from peft's layers with their rank and alpha. Two
namings come in:

- diffusers/peft: ``unet.<module>.lora_A/lora_B`` (``save_lora_weights`` of a peft state
  dict), or the training scripts' mix, where attention projections are saved as
  ``.lora.down/.lora.up`` and every other target as ``lora_A/lora_B``. diffusers converts a
  UNet state dict to peft naming only when its first key asks for it, so on such a mix it
  silently leaves the attention pairs out (peft only warns that config and state dict
  disagree); here every key is converted before loading, so every pair is read.
- kohya (sd-scripts, ComfyUI, A1111): ``lora_unet_<module>.lora_down/.lora_up/.alpha`` with
  diffusers module names (``down_blocks_1_attentions_0_...``) or original SGM ones
  (``input_blocks_4_1_...``), and ``lora_te_``/``lora_te1_``/``lora_te2_`` for text encoders.

The student's LoRA is written in the naming it came in: diffusers/peft naming through
``save_lora_weights`` with adapter metadata (each module's rank and alpha), or kohya naming
with the same module style (SGM names derived from the student's own structure) and alphas
when the file had them. Only the key mapping is written here. Text-encoder pairs are
carried over as they are: the student shares the teacher's text encoders.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import sgm
from workbench.catalog import REST, atom_of, meta_unet
from workbench.errors import WorkbenchError
from workbench.models import Base

ADAPTER = "teacher"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
REPORT_FILE = "lora_report.json"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # as diffusers tells kohya files
_SGM_BLOCKS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")


@dataclass(frozen=True)
class Naming:
    """How a LoRA file names its pairs, so the student's LoRA is written the same way."""

    kind: str  # "diffusers" (unet.<module>.lora_A/B) or "kohya" (lora_unet_<module>.lora_down/up)
    sgm: bool = False  # kohya: original SGM module names (input_blocks_4_1_...), else diffusers'
    alphas: bool = False  # kohya: the file gives each pair an .alpha
    te1_prefix: str = "lora_te1_"  # kohya: the first text encoder's prefix (lora_te_ or lora_te1_)

    def describe(self) -> str:
        if self.kind == "diffusers":
            return "diffusers/peft (unet.<module>.lora_A/lora_B)"
        names = "original SGM module names" if self.sgm else "diffusers module names"
        alphas = "with alphas" if self.alphas else "without alphas"
        return f"kohya (lora_unet_*.lora_down/lora_up, {names}, {alphas})"


@dataclass(frozen=True)
class Pair:
    """One LoRA pair on one module: ``delta W = alpha / r * B @ A`` (peft's scale)."""

    a: Any = field(repr=False)  # (r, in) or (r, in, k, k)
    b: Any = field(repr=False)  # (out, r) or (out, r, 1, 1)
    r: int
    alpha: float
    scale: float

    @property
    def params(self) -> int:
        return self.a.numel() + self.b.numel()

    def delta_norm(self) -> float:
        """|| scale * B @ A ||_F without forming the product: (B^T B) and (A A^T) are r x r."""
        a = self.a.reshape(self.a.shape[0], -1).double()
        b = self.b.reshape(self.b.shape[0], -1).double()
        return float(abs(self.scale) * ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


@dataclass(frozen=True)
class TeacherLora:
    """A LoRA read against the teacher: UNet pairs by teacher module, text-encoder parts as is."""

    unet: dict[str, Pair]
    unet_config: dict[str, Any] = field(repr=False)  # the adapter's LoraConfig, as a dict
    text_encoders: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(
        repr=False
    )  # name -> (state, config)
    sdxl: bool
    naming: Naming = Naming("diffusers")


@dataclass(frozen=True)
class LoraReport:
    """What happened to each pair, and how much of the LoRA survives."""

    kept: tuple[str, ...]  # teacher modules whose student module has the same name
    renamed: tuple[tuple[str, str], ...]  # (teacher module, student module)
    dropped: tuple[str, ...]  # teacher modules the student no longer has
    text_encoder_modules: int  # carried over unchanged
    params_total: int
    params_kept: int
    norm_total: float  # sum over modules of || scale * B @ A ||_F
    norm_kept: float
    misplaced_by_name: int  # pairs a plain load_lora_weights would put on the wrong module
    dropped_by_name: int  # pairs a plain load_lora_weights would drop (no module of that name)
    naming: str = ""  # the file's naming, which the student's LoRA is written in

    @property
    def params_share(self) -> float:
        return self.params_kept / self.params_total if self.params_total else 1.0

    @property
    def norm_share(self) -> float:
        return self.norm_kept / self.norm_total if self.norm_total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "unet_modules": {
                "kept": len(self.kept),
                "renamed": len(self.renamed),
                "dropped": len(self.dropped),
            },
            "text_encoder_modules": self.text_encoder_modules,
            "naming": self.naming,
            "params_share_kept": self.params_share,
            "delta_norm_share_kept": self.norm_share,
            "loaded_by_name_without_remapping": {
                "misplaced": self.misplaced_by_name,
                "dropped": self.dropped_by_name,
            },
            "renamed": {t: s for t, s in self.renamed},
            "dropped": list(self.dropped),
        }

    def lines(self) -> list[str]:
        return [
            f"UNet modules: {len(self.kept)} kept, {len(self.renamed)} renamed, {len(self.dropped)} dropped "
            f"(their teacher modules were removed); {self.text_encoder_modules} text-encoder modules carried over",
            f"surviving: {self.params_share:.1%} of the LoRA's parameters, {self.norm_share:.1%} of its summed "
            "delta norm",
            f"loaded by name without remapping, {self.misplaced_by_name} pairs would land on the wrong module "
            f"and {self.dropped_by_name} would be dropped",
            f"naming: {self.naming}, as the teacher's LoRA came in",
        ]


# --------------------------------------------------------------------------- reading


def check_lora_file(path: str | Path) -> Path:
    """The LoRA's ``.safetensors`` file (a folder may hold exactly one); checked before loading."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise WorkbenchError(
                f"LoRA folder {str(p)!r} holds {len(found)} .safetensors files; give the LoRA file itself"
            )
        p = found[0]
    if not p.is_file():
        raise WorkbenchError(f"LoRA file {str(p)!r} does not exist")
    if p.suffix != ".safetensors":
        raise WorkbenchError(
            f"LoRA file {p.name!r} is not a .safetensors file; convert it to safetensors first (pickled "
            ".bin/.pt/.ckpt files can run code when loaded, so they are refused)"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise WorkbenchError(f"LoRA file {p.name!r} is not a valid safetensors file ({err})") from None
    return p


def _mixin(sdxl: bool):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin


def _empty(model):
    """Real (uninitialised, untouched) storage: peft keeps adapters on their base layer's device."""
    return model.to_empty(device="cpu")


def read_lora(path: str | Path, base: Base) -> TeacherLora:
    """Read a teacher LoRA through diffusers/peft onto an empty-weight copy of the teacher."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = check_lora_file(path)
    naming = file_naming(file)
    config = dict(base.unet_config)
    sdxl = config.get("addition_embed_type") == "text_time"
    mixin = _mixin(sdxl)
    teacher = _empty(meta_unet(config))
    try:
        state, alphas, metadata = mixin.lora_state_dict(
            str(file), unet_config=teacher.config, return_lora_metadata=True
        )
    except (ValueError, KeyError) as err:
        raise WorkbenchError(
            f"LoRA file {file.name!r} is not a LoRA diffusers can read: {_first_line(err)}"
        ) from None
    # every UNet key in peft naming: diffusers converts only when the first key asks for it
    unet_state = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
    state = {k: v for k, v in state.items() if not k.startswith("unet.")} | unet_state
    wanted = {k.removeprefix("unet.").split(".lora")[0] for k in unet_state}
    unet = _load_unet_part(mixin, state, alphas, metadata, teacher, file, base) if unet_state else {}
    _check_every_pair_read(wanted, unet, teacher, file, base)
    if naming.kind == "kohya":
        unet = _with_file_alphas(unet, file, naming, config)
    texts = _load_text_parts(mixin, state, alphas, metadata, base, file)
    lora_config = teacher.peft_config[ADAPTER].to_dict() if unet else {}
    return TeacherLora(unet=unet, unet_config=lora_config, text_encoders=texts, sdxl=sdxl, naming=naming)


def file_naming(file: Path) -> Naming:
    """The naming of a LoRA file, from its keys alone."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    if not keys or not all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return Naming("diffusers")
    return Naming(
        "kohya",
        sgm=any(_SGM_BLOCKS.match(k) for k in keys),
        alphas=any(k.endswith(".alpha") for k in keys),
        te1_prefix="lora_te_" if any(k.startswith("lora_te_") for k in keys) else "lora_te1_",
    )


def _check_every_pair_read(wanted: set[str], unet: dict[str, Pair], teacher, file: Path, base: Base) -> None:
    """Every UNet pair of the file was loaded; an error names a module only if the teacher lacks it."""
    unread = sorted(wanted - set(unet))
    if not unread:
        return
    modules = {name for name, _ in teacher.named_modules()}
    absent = [m for m in unread if m not in modules]
    if absent:
        raise WorkbenchError(_wrong_base(file, base, f"the teacher has no module {absent[0]!r}"))
    raise WorkbenchError(
        f"LoRA {file.name!r}: diffusers/peft left {len(unread)} of its pairs unloaded although the teacher "
        f"has their modules (first: {unread[0]!r}); its key naming is not one this workbench reads "
        "(diffusers/peft or kohya)"
    )


def kohya_unet_name(module: str, naming: Naming, sgm_modules: dict[str, str]) -> str:
    """A UNet module's kohya name: ``lora_unet_`` and its diffusers or SGM path, dots as underscores."""
    path = sgm.unet_key(module, sgm_modules) if naming.sgm else module
    return "lora_unet_" + path.replace(".", "_")


def _with_file_alphas(unet: dict[str, Pair], file: Path, naming: Naming, config: dict) -> dict[str, Pair]:
    """Each pair's alpha as the kohya file gives it (alpha = rank where it gives none, as kohya's
    clients read it). Also checks that every pair maps back to its own key in the file."""
    from safetensors import safe_open

    modules = sgm.unet_module_map(config)
    out = {}
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        for module, pair in unet.items():
            name = kohya_unet_name(module, naming, modules)
            if f"{name}.lora_down.weight" not in keys:
                raise WorkbenchError(
                    f"LoRA {file.name!r}: the pair diffusers read for {module!r} has no key {name!r} in the "
                    "file; its kohya naming is not one this workbench can write back"
                )
            alpha = float(f.get_tensor(f"{name}.alpha").item()) if f"{name}.alpha" in keys else float(pair.r)
            out[module] = Pair(a=pair.a, b=pair.b, r=pair.r, alpha=alpha, scale=alpha / pair.r)
    return out


def _wrong_base(file: Path, base: Base, why: str) -> str:
    return f"LoRA {file.name!r} was not trained on {base.name!r}: {why}; give a LoRA of this teacher"


def _first_line(err: Exception) -> str:
    """The informative line of a loader error: a shape mismatch if there is one."""
    text = str(err)
    m = re.search(
        r"size mismatch for (\S+?)\.lora_[AB]\.\w+\.weight: copying a param with shape torch\.Size\(\[(.*?)\]\) "
        r"from checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)",
        text,
    )
    if m:
        return f"its pair for {m[1]} has shape [{m[2]}] where the teacher's module needs [{m[3]}]"
    return (text.strip().splitlines() or [type(err).__name__])[0][:300]


@contextmanager
def _quiet_loader():
    """diffusers logs a failed adapter load on its own before re-raising; the error says it once."""
    log = logging.getLogger("diffusers.loaders.peft")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_unet_part(mixin, state, alphas, metadata, teacher, file: Path, base: Base) -> dict[str, Pair]:
    from peft.tuners.lora import LoraLayer

    try:
        with _quiet_loader():
            mixin.load_lora_into_unet(
                state, alphas, teacher, adapter_name=ADAPTER, metadata=metadata, low_cpu_mem_usage=True
            )
    except (RuntimeError, ValueError) as err:  # peft: size mismatch, or no target module found
        raise WorkbenchError(_wrong_base(file, base, _first_line(err))) from None
    pairs = {}
    for name, module in teacher.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            if module.use_dora.get(ADAPTER) or module.lora_B[ADAPTER].bias is not None:
                raise WorkbenchError(
                    f"LoRA {file.name!r} uses DoRA or LoRA biases, which remapping does not support"
                )
            pairs[name] = Pair(
                a=module.lora_A[ADAPTER].weight.detach().clone(),
                b=module.lora_B[ADAPTER].weight.detach().clone(),
                r=int(module.r[ADAPTER]),
                alpha=float(module.lora_alpha[ADAPTER]),
                scale=float(module.scaling[ADAPTER]),
            )
    return pairs


def _load_text_parts(mixin, state, alphas, metadata, base: Base, file: Path) -> dict[str, tuple]:
    """Text-encoder pairs checked against the teacher's encoders and read back in peft's naming."""
    from peft.utils import get_peft_model_state_dict

    parts = {}
    for name in TEXT_ENCODERS:
        if not any(k.startswith(f"{name}.") for k in state):
            continue
        encoder = _empty_text_encoder(base, name, file)
        try:
            with _quiet_loader():
                mixin.load_lora_into_text_encoder(
                    state,
                    alphas,
                    encoder,
                    prefix=name,
                    adapter_name=ADAPTER,
                    metadata=metadata,
                    low_cpu_mem_usage=True,
                )
        except (RuntimeError, ValueError) as err:
            raise WorkbenchError(_wrong_base(file, base, f"{name}: {_first_line(err)}")) from None
        weights = get_peft_model_state_dict(encoder, adapter_name=ADAPTER)
        parts[name] = (weights, _json_ready(encoder.peft_config[ADAPTER].to_dict()))
    return parts


def _empty_text_encoder(base: Base, name: str, file: Path):
    import torch
    import transformers

    if not base.has_pipeline or base.kind == "hub":
        raise WorkbenchError(
            f"LoRA {file.name!r} also adapts the {name}, but base {base.name!r} has no local pipeline to "
            "check it against; give the teacher's pipeline folder as --base"
        )
    index = json.loads((Path(base.location) / "model_index.json").read_text(encoding="utf-8"))
    if name not in index or not index[name] or index[name][0] is None:
        raise WorkbenchError(_wrong_base(file, base, f"the teacher has no {name}"))
    cls = getattr(transformers, index[name][1])
    config = cls.config_class.from_pretrained(Path(base.location) / name)
    with torch.device("meta"):
        return _empty(cls(config))


def _json_ready(config: dict[str, Any]) -> dict[str, Any]:
    """A LoraConfig dict that survives JSON (sets become sorted lists)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


# --------------------------------------------------------------------------- remapping


def inverse_layer_map(layer_map: dict[str, str]) -> dict[str, str]:
    """Teacher atom -> the student atom that inherited it."""
    return {t: s for s, t in layer_map.items()}


def student_module(teacher_module: str, inverse: dict[str, str]) -> str | None:
    """The student module that inherited ``teacher_module`` (None if it was removed)."""
    atom = atom_of(teacher_module)
    if atom == REST:  # embeddings, conv in/out: every student has them, unchanged
        return teacher_module
    if atom not in inverse:
        return None
    return inverse[atom] + teacher_module[len(atom) :]


def remap(lora: TeacherLora, layer_map: dict[str, str]) -> tuple[dict[str, Pair], LoraReport]:
    """Student module -> pair, and the report."""
    inverse = inverse_layer_map(layer_map)
    student_atoms = set(layer_map)
    moved: dict[str, Pair] = {}
    kept, renamed, dropped = [], [], []
    misplaced = absent = 0
    for name, pair in lora.unet.items():
        target = student_module(name, inverse)
        if target is None:
            dropped.append(name)
        elif target == name:
            kept.append(name)
        else:
            renamed.append((name, target))
        if target is not None:
            moved[target] = pair
        atom = atom_of(name)
        if atom != REST and atom not in student_atoms:
            absent += 1
        elif atom != REST and layer_map[atom] != atom:
            misplaced += 1
    text_pairs = sum(len([k for k in w if ".lora_A." in k]) for w, _ in lora.text_encoders.values())
    text_params = sum(sum(t.numel() for t in w.values()) for w, _ in lora.text_encoders.values())
    unet_params = sum(p.params for p in lora.unet.values())
    report = LoraReport(
        kept=tuple(kept),
        renamed=tuple(renamed),
        dropped=tuple(dropped),
        text_encoder_modules=text_pairs,
        params_total=unet_params + text_params,
        params_kept=sum(p.params for p in moved.values()) + text_params,
        norm_total=sum(p.delta_norm() for p in lora.unet.values()) + _text_norms(lora),
        norm_kept=sum(p.delta_norm() for p in moved.values()) + _text_norms(lora),
        misplaced_by_name=misplaced,
        dropped_by_name=absent,
        naming=lora.naming.describe(),
    )
    return moved, report


def _text_norms(lora: TeacherLora) -> float:
    total = 0.0
    for weights, config in lora.text_encoders.values():
        for key, a in weights.items():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                r, alpha = _rank_alpha(module, config)
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                total += Pair(a=a, b=b, r=r, alpha=alpha, scale=alpha / r).delta_norm()
    return total


def _rank_alpha(module: str, config: dict[str, Any]) -> tuple[int, float]:
    """A module's rank and alpha under a LoraConfig dict (its patterns name full module paths)."""

    def pick(patterns: dict[str, Any] | None, default: Any) -> Any:
        return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", module)), default)

    return int(pick(config.get("rank_pattern"), config["r"])), float(
        pick(config.get("alpha_pattern"), config["lora_alpha"])
    )


# --------------------------------------------------------------------------- writing


def student_lora_config(lora: TeacherLora, pairs: dict[str, Pair]) -> dict[str, Any]:
    """The teacher's LoraConfig with the student's module names: explicit targets, and each
    module's rank and alpha (escaped: peft reads pattern keys as regular expressions)."""
    from collections import Counter

    r = Counter(p.r for p in pairs.values()).most_common(1)[0][0]
    alpha = Counter(p.alpha for p in pairs.values()).most_common(1)[0][0]
    config = _json_ready(dict(lora.unet_config))
    config |= {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(pairs),
        "rank_pattern": {re.escape(m): p.r for m, p in pairs.items() if p.r != r},
        "alpha_pattern": {re.escape(m): p.alpha for m, p in pairs.items() if p.alpha != alpha},
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config


def save_lora(
    lora: TeacherLora,
    pairs: dict[str, Pair],
    report: LoraReport,
    out: str | Path,
    student_config: dict[str, Any] | None = None,
) -> Path:
    """Write the student's LoRA in the naming the teacher's came in (``load_lora_weights(out)``
    reads either) and the report. ``student_config`` names the student's SGM modules for a
    kohya LoRA with SGM names."""
    out = Path(out)
    if not pairs and not lora.text_encoders:
        raise WorkbenchError("nothing of this LoRA survives on the student: every pair's module was removed")
    if lora.naming.kind == "kohya":
        _save_kohya(lora, pairs, out, student_config)
    else:
        _save_diffusers(lora, pairs, out)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out / WEIGHT_NAME


def _save_diffusers(lora: TeacherLora, pairs: dict[str, Pair], out: Path) -> None:
    unet = {}
    for module, pair in pairs.items():
        unet[f"{module}.lora_A.weight"] = pair.a.contiguous()
        unet[f"{module}.lora_B.weight"] = pair.b.contiguous()
    kwargs: dict[str, Any] = {}
    if unet:
        kwargs |= {"unet_lora_layers": unet, "unet_lora_adapter_metadata": student_lora_config(lora, pairs)}
    for name, (weights, config) in lora.text_encoders.items():
        kwargs |= {f"{name}_lora_layers": weights, f"{name}_lora_adapter_metadata": config}
    _mixin(lora.sdxl).save_lora_weights(str(out), weight_name=WEIGHT_NAME, **kwargs)


def kohya_state(
    lora: TeacherLora, pairs: dict[str, Pair], student_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The student's pairs in the teacher file's kohya naming: same module style, alphas if it had them."""
    import torch

    naming = lora.naming
    if naming.sgm and student_config is None:
        raise ValueError("a kohya LoRA with SGM names needs the student's config to name its modules")
    modules = sgm.unet_module_map(student_config) if naming.sgm else {}
    named = {kohya_unet_name(m, naming, modules): p for m, p in pairs.items()}
    for encoder, (weights, config) in lora.text_encoders.items():
        prefix = naming.te1_prefix if encoder == "text_encoder" else "lora_te2_"
        for key, a in weights.items():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                r, alpha = _rank_alpha(module, config)
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                named[kohya_text_name(prefix, module)] = Pair(a=a, b=b, r=r, alpha=alpha, scale=alpha / r)
    state = {}
    for name, pair in named.items():
        state[f"{name}.lora_down.weight"] = pair.a.contiguous()
        state[f"{name}.lora_up.weight"] = pair.b.contiguous()
        if naming.alphas:
            state[f"{name}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    return state


def kohya_text_name(prefix: str, module: str) -> str:
    """A CLIP module's kohya name. transformers 5 dropped CLIPTextModel's ``text_model`` level,
    which kohya's names (and its clients) keep: ``lora_te1_text_model_encoder_layers_0_...``."""
    if module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        module = "text_model." + module
    return prefix + module.replace(".", "_")


def _save_kohya(lora: TeacherLora, pairs: dict[str, Pair], out: Path, student_config) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state(lora, pairs, student_config), str(out / WEIGHT_NAME), metadata={"format": "pt"})
