"""What a distillation run is asked to do (``DistillConfig``) and the one preflight that
checks it before any model is loaded: used by the recipe, the CLI and the app alike.

Every bad value raises a ``ConfigError`` that carries the field it is about, so the CLI
names its flag and the app its label.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import data
from workbench.catalog import build_catalog
from workbench.cost import MAX_RESOLUTION
from workbench.errors import ConfigError, WorkbenchError
from workbench.losses import LCD_LOSSES, OBJECTIVES, LossWeights
from workbench.models import resolve_base
from workbench.optim import check_optimizer_device
from workbench.plan import PruningPlan
from workbench.presets import load_preset
from workbench.reward import FORMS, check_reward_spec
from workbench.runs import RunDir
from workbench.schedulers import LCM_MAX_STEPS, MAX_STEPS
from workbench.sensitivity import Calibration
from workbench.sensitivity_kd import FEATURE_WEIGHTS, kept_layer_units
from workbench.surgery import FEATURE_MODES, compile_plan, derive_stage_plan
from workbench.trackers import REPORT_TO

PRECISIONS = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("fp32", "bf16", "fp16")
STAGE_TEACHERS = ("original", "previous")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "adamw8bit")
TEACHER_TARGETS = ("live", "precompute")  # workbench.targets.MODES


@dataclass(frozen=True)
class Option:
    """How a ``DistillConfig`` field is offered, declared once beside the field: the ``distill``
    flag (``--`` + the name with dashes) and its help, its choices, whether ``memory`` takes it
    too, and its label (and hint) in the app's Distill form. The CLI parsers and the form are
    generated from these; a field without an ``Option`` is set only by code or by ``stages``."""

    help: str
    label: str | None = None  # the app's name for it; None: not on the form
    choices: tuple[str, ...] | None = None
    memory: bool = False  # the memory estimate depends on it (a ``memory`` flag too)
    hint: str = ""  # a line under the form's box


def option(default: Any = dataclasses.MISSING, help: str = "", **how: Any) -> Any:
    """A field declared with its ``Option`` (defaults are immutable values here)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **how)})


@dataclass(frozen=True)
class DistillConfig:
    """Everything a run needs; saved as job.json and reloaded on resume. Each option's flag,
    help, choices and label are declared here, once (``Option``)."""

    stages: tuple[dict[str, Any], ...]  # plans (dicts) over the teacher, each removing more
    steps: int = option(help="optimizer steps per stage", label="Steps")
    base: str = "toy"
    data: str = option(
        "toy", "training data: toy (default), an image folder (metadata.jsonl or .txt captions), or a .txt "
        "prompt file", label="Data", memory=True,
    )  # fmt: skip
    toy_samples: int = option(2048, "number of toy images to render and cache (toy data)", label="Toy images")
    resolution: int | None = option(
        None, "training resolution in px (default: the teacher pipeline's)", memory=True
    )
    batch_size: int = option(8, "batch per process", label="Batch size", memory=True)
    grad_accum: int = option(1, "gradient accumulation steps", memory=True)
    lr: float = option(1e-4, "learning rate (AdamW)", label="Learning rate")
    lr_schedule: str = option("constant", "learning-rate schedule", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    w_task: float = option(1.0, "weight of the task loss (noise / v MSE)", label="λ task")
    w_out: float = option(
        0.5, "weight of the output KD loss (0 with no feature loss: no teacher forward)", label="λ output KD",
        memory=True,
    )  # fmt: skip
    w_feat: float = option(
        0.5, "weight of the summed feature KD loss (0: no feature hooks)", label="λ feature KD", memory=True
    )
    feature_mode: str = option(
        "layer", "feature KD: layer (every kept ResNet/attention), block, self-attention, none",
        label="Feature loss", choices=FEATURE_MODES, memory=True,
    )  # fmt: skip
    normalize_features: bool = option(False, "divide each feature term by the teacher feature's mean square")
    feature_weights: str = option(
        "uniform", "weight of each feature KD term: uniform (default) or by the sensitivity of the teacher "
        "layer it matches (measured once per teacher and cached; weights average 1)", label="Feature weights",
        choices=FEATURE_WEIGHTS, hint="sensitivity: weight each feature term by how much removing its teacher "
        "layer hurts (map measured once per teacher, then cached)",
    )  # fmt: skip
    freeze_sensitive: int = option(
        0, "freeze the student modules of the N most sensitive kept teacher layers (sensitivity map; ties: "
        "earliest first); 0 (default) freezes nothing", label="Freeze most sensitive",
        hint="freeze the student layers inherited from the N most sensitive teacher layers",
    )  # fmt: skip
    # overrides of workbench.sensitivity.Calibration for the map (empty: the defaults)
    sensitivity_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage_teacher: str = option(
        "original", "who teaches stage 2+: the original teacher or the previous stage's student",
        label="Stage teacher", choices=STAGE_TEACHERS, memory=True,
    )  # fmt: skip
    mixed_precision: str = option(
        "no", "student mixed precision (fp16 needs CUDA)", label="Mixed precision", choices=PRECISIONS,
        memory=True,
    )  # fmt: skip
    teacher_dtype: str = option(
        "fp32", "teacher precision (it runs without gradients)", choices=TEACHER_DTYPES, memory=True
    )
    gradient_checkpointing: bool = option(False, "trade compute for memory (recompute activations)", memory=True)
    uncond_prob: float = option(0.1, "probability of dropping the prompt (classifier-free guidance)")
    seed: int = option(0, "seed of data order, noise and timesteps")
    device: str = option("auto", "where to train", choices=DEVICES)
    log_every: int = option(1, "write a metrics row every N steps")
    checkpoint_every: int = option(100, "checkpoint every N steps", label="Checkpoint every")
    keep_checkpoints: int = option(2, "keep the last N checkpoints")
    sample_every: int = option(
        0, "teacher-vs-student sample grid every N steps (0: at the end only; grids bring a parked pipeline "
        "back)", label="Samples every", memory=True,
    )  # fmt: skip
    sample_steps: int = option(20, "denoising steps for sample grids")
    sample_seed: int = option(
        0, "seed of the sample grids' first prompt (the next prompts take the following seeds)",
        label="Sample seed", hint="the grids' noise: the first prompt's seed, then +1 per prompt",
    )  # fmt: skip
    sample_guidance: float | None = option(
        None, "guidance scale for sample grids (default: the base's, toy 2, others 5)"
    )
    sample_prompts: tuple[str, ...] = ()
    teacher_image_steps: int = option(
        20, "prompt-file data (--data prompts.txt): denoising steps the teacher draws each training image "
        "with, at the run's --resolution",
    )  # fmt: skip
    teacher_image_guidance: float | None = option(
        None, "prompt-file data: guidance scale the teacher draws training images with (default: the base's, "
        "toy 2, others 5)",
    )  # fmt: skip
    optimizer: str = option(
        "adamw", "adamw, or adamw8bit (bitsandbytes: a quarter of AdamW's state memory)", choices=OPTIMIZERS,
        memory=True,
    )  # fmt: skip
    lora_rank: int = option(
        0, "LoRA-enhanced distillation: adapters of this rank where a layer's input is unchanged, full "
        "weights where the plan changed it; merged for export (0, default: full weights everywhere)",
        memory=True,
    )  # fmt: skip
    # What each stage optimises (losses.OBJECTIVES): "kd" (block-removal KD) or "lcd" (latent
    # consistency distillation: a few-step, w-conditioned student); empty: every stage "kd".
    objectives: tuple[str, ...] = ()
    lcd_guidance_min: float | None = option(
        None, "lcd: lowest guidance scale drawn for the teacher (default: 0.75 x the base's, at least 1)",
        label="LCD guidance min", hint="lowest guidance scale the teacher runs with; empty: the base's",
    )  # fmt: skip
    lcd_guidance_max: float | None = option(
        None, "lcd: highest guidance scale drawn for the teacher (default: 1.5 x the base's)",
        label="LCD guidance max", hint="highest guidance scale; empty: the base's",
    )  # fmt: skip
    lcd_ema: float = option(
        0.95, "lcd: decay of the EMA target network", label="LCD EMA decay", hint="of the target network, in [0, 1)"
    )
    lcd_loss: str = option(
        "huber", "lcd: huber (pseudo-Huber, default) or l2", label="LCD loss", choices=LCD_LOSSES,
        hint="huber (pseudo-Huber) or l2",
    )  # fmt: skip
    lcd_huber_c: float = option(
        0.001, "lcd: the pseudo-Huber loss's c", label="LCD Huber c", hint="the pseudo-Huber loss's c, > 0"
    )
    lcd_sample_steps: int = option(
        4, "lcd: LCM steps of the sample grids (1-8)", label="LCM sample steps",
        hint="LCM steps of the sample grids, 1 to 8",
    )  # fmt: skip
    lcd_lora_rank: int = option(
        0, "lcd: LCM-LoRA, adapters of this rank on the student (no guidance embedding), also saved as "
        "RUN_DIR/lcm_lora for load_lora_weights (0, default: full weights with the guidance embedding)",
        label="LCM-LoRA rank", memory=True,
        hint="> 0: LCM-LoRA adapters of this rank; 0: full weights with the guidance embedding",
    )  # fmt: skip
    # RG-LCD: a differentiable reward of the lcd stage's one-step prediction (workbench.reward)
    lcd_reward: str | None = option(
        None, "lcd: reward guidance (RG-LCD) of the one-step prediction: a reward folder, toy (the shipped "
        "proxy of the toy checker), or a differentiable scorer (latents, cond) -> (B,) as path/to/file.py:name "
        "or package.module:name (needs --lcd-reward-weight)", label="RG-LCD reward",
        hint="empty: plain LCD; toy (the shipped toy proxy), a reward folder, or file.py:name",
    )  # fmt: skip
    lcd_reward_weight: float = option(
        0.0, "lcd: weight of the reward term, loss - weight x mean reward (e.g. 0.1)",
        label="RG-LCD reward weight", hint="weight of the reward term (> 0 with a reward, 0 without)",
    )  # fmt: skip
    teacher_targets: str = option(
        "live", "live (default): the teacher runs beside the student at every step; precompute: its outputs "
        "and features are written to the run folder before a stage's student steps and read back, so the "
        "teacher is off the GPU while the student trains (disk: see `python -m workbench memory`)",
        choices=TEACHER_TARGETS, memory=True,
    )  # fmt: skip
    init_student: str | None = option(
        None, "stage 1's student starts from this trained student (a run folder or a UNet folder of stage 1's "
        "architecture) instead of the teacher's kept weights, e.g. --objective lcd on a kd run's student",
    )  # fmt: skip
    report_to: str = option(
        "none", "also log the config, losses and sample grids to a tracker through accelerate "
        "(metrics.jsonl stays the run's record)", choices=REPORT_TO,
    )  # fmt: skip

    @property
    def guidance(self) -> float:
        """The guidance scale samples are drawn with: ``sample_guidance``, else the base's."""
        return self.sample_guidance if self.sample_guidance is not None else resolve_base(self.base).guidance

    @property
    def image_guidance(self) -> float:
        """The guidance scale the teacher draws prompt-file training images with."""
        given = self.teacher_image_guidance
        return given if given is not None else resolve_base(self.base).guidance

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise WorkbenchError(f"job.json has unknown keys {unknown}; it was written by another version")
        data = dict(data)
        data["stages"] = tuple(data["stages"])
        data["sample_prompts"] = tuple(data.get("sample_prompts", ()))
        data["objectives"] = tuple(data.get("objectives", ()))
        return cls(**data)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default of every field that has one (for forms and flags: no hand copies)."""
        return {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }

    @property
    def needs_sensitivity(self) -> bool:
        return self.feature_weights == "sensitivity" or self.freeze_sensitive != 0

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.w_task, self.w_out, self.w_feat)

    def stage_kind(self, k: int) -> str:
        """What stage ``k`` optimises (a key of ``losses.OBJECTIVES``)."""
        return self.objectives[k] if self.objectives else "kd"

    @property
    def has_lcd(self) -> bool:
        return "lcd" in self.objectives

    @property
    def lcd_guidance(self) -> tuple[float, float]:
        """The guidance scales LCD draws the teacher's from: the fields, else the base's
        sampling scale g as the range [0.75 g, 1.5 g] (the toy: 1.5 to 3)."""
        g = self.guidance
        low = self.lcd_guidance_min if self.lcd_guidance_min is not None else max(1.0, 0.75 * g)
        high = self.lcd_guidance_max if self.lcd_guidance_max is not None else max(low, 1.5 * g)
        return low, high

    def plans(self) -> list[PruningPlan]:
        return [PruningPlan.from_dict(s, origin=f"stage {i + 1} plan") for i, s in enumerate(self.stages)]


# --------------------------------------------------------------------------- stage lists

LCD_STAGE = "lcd"  # in a stage list: consistency distillation on the plan before it


def stage_list(text: str | None) -> list[str]:
    """The names of a comma-separated stage list (``--stages``, the app's form), in order."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def stage_fields(names: list[Any], objective: str | None = None) -> dict[str, Any]:
    """``stages`` (plans) and ``objectives`` of a stage list (``--stages``, the app's form):
    preset names, plan files or ``PruningPlan`` values, and ``lcd``, which repeats the plan
    before it as a latent consistency distillation stage. ``objective`` (with one plan) says
    what that stage optimises."""
    plans, kinds = [], []
    for name in names:
        if name == LCD_STAGE:
            if not plans:
                raise ConfigError("stages", "{field}: lcd needs a plan before it, e.g. segmind-vega,lcd")
            plans.append(plans[-1])
            kinds.append("lcd")
        else:
            plans.append((name if isinstance(name, PruningPlan) else load_preset(name)).to_dict())
            kinds.append("kd")
    if objective is not None:
        kinds = [objective]
    fields: dict[str, Any] = {"stages": tuple(plans)}
    if any(k != "kd" for k in kinds):
        fields["objectives"] = tuple(kinds)
    return fields


# --------------------------------------------------------------------------- field checks

# whole-number fields: (smallest valid value, what a valid value is)
WHOLE = {
    "steps": (1, "> 0"),
    "batch_size": (1, "> 0"),
    "grad_accum": (1, "> 0"),
    "toy_samples": (1, "> 0"),
    "warmup_steps": (0, ">= 0"),
    "seed": (0, ">= 0"),
    "log_every": (1, "> 0"),
    "checkpoint_every": (1, "> 0"),
    "keep_checkpoints": (1, "> 0"),
    "sample_every": (0, ">= 0 (0: only at the end)"),
    "sample_steps": (1, f"from 1 to {MAX_STEPS}"),
    "sample_seed": (0, ">= 0"),
    "teacher_image_steps": (1, "> 0"),
    "freeze_sensitive": (0, "a whole number >= 0 (0: freeze nothing)"),
    "lora_rank": (0, "a whole number >= 0 (0: train full weights)"),
    "lcd_sample_steps": (1, "a whole number of LCM steps from 1 to 8"),
    "lcd_lora_rank": (0, "a whole number >= 0 (0: full weights with the guidance embedding)"),
}
MAX_WHOLE = 2**31 - 1  # beyond any real run, and beyond the int32 counters and indices it would meet
WHOLE_MAX = {"lcd_sample_steps": LCM_MAX_STEPS, "sample_steps": MAX_STEPS}  # fields with a ceiling of their own
# real-number fields: (lowest value, whether it is allowed, highest value (excluded), text)
REAL = {
    "lr": (0.0, False, None, "> 0"),
    "weight_decay": (0.0, True, None, ">= 0"),
    "max_grad_norm": (0.0, True, None, ">= 0 (0: no clipping)"),
    "w_task": (0.0, True, None, ">= 0"),
    "w_out": (0.0, True, None, ">= 0"),
    "w_feat": (0.0, True, None, ">= 0"),
    "uncond_prob": (0.0, True, 1.0, "in [0, 1)"),
    "sample_guidance": (0.0, True, None, ">= 0"),
    "teacher_image_guidance": (0.0, True, None, ">= 0"),
    "lcd_guidance_min": (1.0, True, None, ">= 1 (1: no guidance)"),
    "lcd_guidance_max": (1.0, True, None, ">= 1 (1: no guidance)"),
    "lcd_ema": (0.0, True, 1.0, "in [0, 1)"),
    "lcd_huber_c": (0.0, False, None, "> 0"),
    "lcd_reward_weight": (0.0, True, None, ">= 0 (0: no reward guidance)"),
}
# None: the base's
OPTIONAL_REAL = ("sample_guidance", "teacher_image_guidance", "lcd_guidance_min", "lcd_guidance_max")
def options() -> dict[str, Option]:
    """Every field offered as an option, in declaration order, with its ``Option``."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(DistillConfig) if "option" in f.metadata}


CHOICES = {name: opt.choices for name, opt in options().items() if opt.choices}
FLAGS = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.type == "bool")


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_finite(field: str, value: Any, kind: str) -> None:
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(field, f"{{field}} is not a number (got nan); give {kind}")
    if isinstance(value, float) and math.isinf(value):
        size = "too large" if value > 0 else "too far below zero"
        raise ConfigError(
            field, f"{{field}} is not a finite number (got {{got}}: {size}); give {kind}", got=value
        )


def check_whole(field: str, value: Any) -> None:
    low, text = WHOLE[field]
    kind = text if text.startswith("a whole number") else f"a whole number {text}"
    if value is None:
        raise ConfigError(field, f"{{field}} is missing; give {kind}")
    _check_finite(field, value, kind)
    if not _is_whole(value):
        raise ConfigError(field, f"{{field}} must be {kind}, got {{got!r}}", got=value)
    if value < low or (field in WHOLE_MAX and value > WHOLE_MAX[field]):
        raise ConfigError(field, f"{{field}} must be {text}, got {{got}}", got=value)
    if value > MAX_WHOLE:
        raise ConfigError(field, "{field} {got} is too large; at most {most}", got=value, most=MAX_WHOLE)


def check_real(field: str, value: Any) -> None:
    low, low_ok, high, text = REAL[field]
    if value is None:
        raise ConfigError(field, f"{{field}} is missing; give a number {text}")
    _check_finite(field, value, f"a number {text}")
    if not _is_real(value):
        raise ConfigError(field, f"{{field}} must be a number {text}, got {{got!r}}", got=value)
    if value < low or (value == low and not low_ok) or (high is not None and value >= high):
        raise ConfigError(field, f"{{field}} must be {text}, got {{got}}", got=value)


def check_choice(field: str, value: Any) -> None:
    choices = CHOICES[field]
    if value not in choices:
        what = "feature mode {got!r} ({field})" if field == "feature_mode" else "{field} {got!r}"
        raise ConfigError(
            field, f"unknown {what}; choose one of {{choices}}", got=value, choices=", ".join(choices)
        )


def check_fields(config: DistillConfig) -> None:
    """Each field on its own: type, range, choices (the first bad one raises)."""
    for name in ("base", "data"):
        value = getattr(config, name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(name, "{field} is missing; give one")
    if not config.stages:
        raise ConfigError("stages", "a run needs at least one stage (a plan: {stages})")
    for name in WHOLE:
        check_whole(name, getattr(config, name))
    for name in REAL:
        if name in OPTIONAL_REAL and getattr(config, name) is None:
            continue
        check_real(name, getattr(config, name))
    for name in CHOICES:
        check_choice(name, getattr(config, name))
    for name in FLAGS:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(
                name, "{field} is a switch: true or false, got {got!r}", got=getattr(config, name)
            )
    if config.resolution is not None:
        value = config.resolution
        if not _is_whole(value) or value < 32 or value % 32 or value > MAX_RESOLUTION:
            raise ConfigError(
                "resolution", "{resolution} must be a multiple of 32 (px) up to {most}, or empty for the "
                "pipeline's own, got {got!r}", got=value, most=MAX_RESOLUTION,
            )  # fmt: skip
    if not all(isinstance(p, str) and p.strip() for p in config.sample_prompts):
        raise ConfigError("sample_prompts", "{sample_prompts}: every sample prompt needs some text")
    check_objectives(config)


def check_objectives(config: DistillConfig) -> None:
    """One known objective per stage; consistency distillation last (its student is
    w-conditioned: block removal after it would have to rebuild that)."""
    kinds = config.objectives
    if config.lcd_lora_rank and "lcd" not in kinds:
        raise ConfigError(
            "lcd_lora_rank", "{field} is the LCM-LoRA form of an lcd stage, but no stage is lcd; end "
            "{stages} with lcd or use {objectives} lcd",
        )  # fmt: skip
    check_reward_fields(config)
    if not kinds:
        return
    if len(kinds) != len(config.stages):
        raise ConfigError(
            "objectives", "{field} names {got} objectives for {n} stages; give one per stage",
            got=len(kinds), n=len(config.stages),
        )  # fmt: skip
    for kind in kinds:
        if kind not in OBJECTIVES:
            raise ConfigError(
                "objectives", "unknown objective {got!r} ({field}); choose one of {choices}",
                got=kind, choices=", ".join(OBJECTIVES),
            )  # fmt: skip
    if "lcd" in kinds[:-1]:
        raise ConfigError(
            "objectives", "{field}: only the last stage can be lcd (got {got}); put block-removal "
            "stages first, e.g. --stages segmind-vega,lcd", got=",".join(kinds),
        )  # fmt: skip


def check_reward_fields(config: DistillConfig) -> None:
    """RG-LCD: a reward and a weight > 0 come together, on a run with an lcd stage."""
    reward, weight = config.lcd_reward, config.lcd_reward_weight
    if reward is not None and (not isinstance(reward, str) or not reward.strip()):
        raise ConfigError("lcd_reward", "{field} is empty; give " + FORMS + ", or leave it out")
    if reward is None and weight > 0:
        raise ConfigError(
            "lcd_reward_weight", "{field} {got:g} asks for reward guidance but there is no reward; give "
            "{lcd_reward} (" + FORMS + ") or set {field} 0", got=weight,
        )  # fmt: skip
    if reward is not None and weight == 0:
        raise ConfigError(
            "lcd_reward", "{field} {got!r} is given but {lcd_reward_weight} is 0: it would do nothing; "
            "give a weight > 0 (e.g. 0.1) or drop {field}", got=reward,
        )  # fmt: skip
    if reward is not None and "lcd" not in config.objectives:
        raise ConfigError(
            "lcd_reward", "{field} guides an lcd stage, but no stage is lcd; end {stages} with lcd or "
            "use {objectives} lcd",
        )  # fmt: skip


def check_combination(config: DistillConfig) -> None:
    """Fields that are fine alone but not together, and what this machine can run."""
    if config.w_task + config.w_out + config.w_feat <= 0:
        raise ConfigError("w_task", "{w_task}, {w_out} and {w_feat} are all 0: nothing to train")
    if config.feature_weights == "sensitivity" and (config.feature_mode == "none" or config.w_feat == 0):
        raise ConfigError(
            "feature_weights", "{feature_weights} sensitivity weights the feature KD terms, but there "
            "are none ({feature_mode} none or {w_feat} 0); use {feature_weights} uniform",
        )  # fmt: skip
    if config.needs_sensitivity or config.sensitivity_settings:
        sensitivity_settings(config)
    if config.has_lcd:
        check_lcd_combination(config)
    if config.device == "cuda" and not _cuda_available():
        raise ConfigError("device", "{device} cuda was asked for but no CUDA GPU is available; use cpu")
    if config.mixed_precision == "fp16" and not use_cuda(config):
        raise ConfigError("mixed_precision", "{mixed_precision} fp16 needs a CUDA GPU; on CPU use bf16 or no")
    if config.teacher_dtype == "fp16" and not use_cuda(config):
        raise ConfigError("teacher_dtype", "{teacher_dtype} fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if config.optimizer != "adamw":
        try:
            check_optimizer_device(config.optimizer, "cuda" if use_cuda(config) else "cpu")
        except WorkbenchError as err:
            raise ConfigError.about("optimizer", err) from None


def check_lcd_combination(config: DistillConfig) -> None:
    low, high = config.lcd_guidance_min, config.lcd_guidance_max
    if low is not None and high is not None and low > high:
        raise ConfigError(
            "lcd_guidance_min", "the guidance range runs backwards: {lcd_guidance_min} {low:g} > "
            "{lcd_guidance_max} {high:g}; give min <= max", low=low, high=high,
        )  # fmt: skip
    if config.lora_rank:
        raise ConfigError(
            "lora_rank", "{field} (LoRA-enhanced KD) does not apply to an lcd stage; drop it for a "
            "full-weight consistency distillation",
        )  # fmt: skip
    if config.teacher_targets == "precompute":
        raise ConfigError(
            "teacher_targets", "{field} precompute does not apply to an lcd stage: its targets come "
            "from the teacher and the moving EMA target network at every step; use live",
        )  # fmt: skip


def validate(config: DistillConfig) -> None:
    """Reject bad options before anything is loaded or trained (precise messages)."""
    check_fields(config)
    check_combination(config)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def use_cuda(config: DistillConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and _cuda_available())


def sensitivity_settings(config: DistillConfig):
    """The calibration settings of the run's sensitivity map (checked)."""
    names = {f.name for f in dataclasses.fields(Calibration)}
    settings = config.sensitivity_settings
    unknown = sorted(set(settings) - names) if isinstance(settings, dict) else None
    if unknown is None or unknown:
        raise ConfigError(
            "sensitivity_settings", "unknown sensitivity settings {got}; known: {known}",
            got=unknown, known=", ".join(sorted(names)),
        )  # fmt: skip
    try:
        return Calibration(**settings).check()
    except WorkbenchError as err:
        raise ConfigError.about("sensitivity_settings", err) from None


# --------------------------------------------------------------------------- checks that read files


def check_data(config: DistillConfig) -> None:
    """Cheap checks of the data source before loading any model."""
    try:
        data.check_source(config.data)
    except WorkbenchError as err:
        raise ConfigError.about("data", err) from None


def check_plans(config: DistillConfig, teacher_config: dict[str, Any]) -> list[Any]:
    """Compile every stage against the teacher (errors before any weight moves)."""
    try:
        catalog = build_catalog(teacher_config)
        specs = [compile_plan(catalog, plan) for plan in config.plans()]
        for i in range(1, len(specs)):
            derive_stage_plan(specs[i - 1], specs[i], name=f"stage-{i + 1}")
    except WorkbenchError as err:
        raise ConfigError.about("stages", err) from None
    return specs


def init_student_folder(value: str) -> Path:
    """The UNet folder ``init_student`` names: a run folder (its trained ``student``) or a
    UNet folder itself."""
    path = Path(value).expanduser()
    if (path / "student" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "student"
    return path


def check_init_student(config: DistillConfig, specs: list[Any]) -> None:
    """``init_student`` must hold a UNet of stage 1's architecture (read from its config alone)."""
    if config.init_student is None:
        return
    from diffusers import UNet2DConditionModel

    path = init_student_folder(config.init_student)
    if not (path / "config.json").is_file():
        raise ConfigError(
            "init_student", "{field} {got!r} holds no student (no config.json, nor student/config.json); "
            "give a run folder or a UNet folder written by a run or `python -m workbench export`",
            got=config.init_student,
        )  # fmt: skip
    found = UNet2DConditionModel.load_config(path)
    wanted = specs[0].config
    telling = ("block_out_channels", "down_block_types", "layers_per_block", "transformer_layers_per_block")
    for key in sorted((k for k in wanted if not k.startswith("_")), key=lambda k: (k not in telling, k)):
        if _as_list(found.get(key)) != _as_list(wanted.get(key)):
            raise ConfigError(
                "init_student", "{field} {got!r} has {key}={have!r}, but stage 1's plan {plan!r} gives "
                "{want!r}; give a student of that plan (e.g. a kd run's student with the same preset)",
                got=str(path), key=key, have=found.get(key), want=wanted.get(key), plan=specs[0].plan.name,
            )  # fmt: skip


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_guidance(config: DistillConfig, specs: list[Any]) -> None:
    """``freeze_sensitive`` must leave each stage's student something to freeze from."""
    n = config.freeze_sensitive
    for k, spec in enumerate(specs):
        kept = len(kept_layer_units(spec))
        if n > kept:
            raise ConfigError(
                "freeze_sensitive",
                "{freeze_sensitive} {n}: stage {k}'s student (plan {plan!r}) keeps only {kept} layer "
                "units (down/up layers, the mid block's ResNet and attention); choose 0 to {kept}",
                n=n, k=k + 1, plan=spec.plan.name, kept=kept,
            )  # fmt: skip


def check_base(config: DistillConfig, base=None):
    """The teacher, resolved (no weights loaded): it must have a pipeline to distil from."""
    if base is None:
        try:
            base = resolve_base(config.base)
        except WorkbenchError as err:
            raise ConfigError.about("base", err) from None
    if config.needs_sensitivity and not base.has_pipeline:
        raise ConfigError(
            "base", "{feature_weights} sensitivity and {freeze_sensitive} need the teacher's sensitivity "
            "map, measured by running its pipeline; base {name!r} has no pipeline (give a pipeline folder "
            "or hub id, or drop these options)", name=base.name,
        )  # fmt: skip
    if not base.has_pipeline:
        raise ConfigError(
            "base", "base {name!r} has no pipeline (text encoders, VAE); distillation needs a teacher "
            "with weights", name=base.name,
        )  # fmt: skip
    if config.has_lcd:
        check_lcd_base(base)
    if config.lcd_reward is not None:
        check_reward(config, base)
    return base


def check_reward(config: DistillConfig, base) -> None:
    """The reward's form, and a reward folder's config against the teacher, or the user's
    scorer found in its file or module (no weights read, a factory not called)."""

    try:
        check_reward_spec(config.lcd_reward, base)
    except WorkbenchError as err:
        raise ConfigError("lcd_reward", "{field}: {text}", text=str(err)) from None


def check_lcd_base(base) -> None:
    """Consistency distillation solves the teacher's ODE on its noise schedule: the pipeline
    must say what it is (a local pipeline's scheduler config is read here)."""
    if base.kind == "hub":
        return  # read when the pipeline loads
    path = Path(base.location) / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(
            "base", "lcd needs the teacher's noise schedule, but base {name!r} has no readable "
            "scheduler/scheduler_config.json", name=base.name,
        ) from None  # fmt: skip
    kind = scheduler.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ConfigError(
            "base", "lcd: base {name!r} predicts {kind!r}; LCD supports epsilon, v_prediction and sample",
            name=base.name, kind=kind,
        )  # fmt: skip
    if kind == "epsilon" and scheduler.get("rescale_betas_zero_snr"):
        raise ConfigError(
            "base", "lcd: base {name!r} predicts epsilon on a zero-terminal-SNR schedule, where the "
            "clean latents cannot be read from the noise at t=999 (on LCD's grid); LCD needs v_prediction "
            "or sample with zero terminal SNR, or a schedule without it", name=base.name,
        )  # fmt: skip


def check_run_dir(run_dir: str | Path, resume: bool, launched: bool = False) -> RunDir:
    """The run folder can hold this run: new (without resume), an existing run (with it), or
    (``launched``) one whose job.json holds only the config the app validated and wrote."""
    run = RunDir(Path(run_dir))
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(
            "run_dir", "{field} {path!r} is a file, not a folder; choose a folder", path=str(run.root)
        )
    if resume and not run.job.exists():
        raise ConfigError(
            "run_dir", "{field} {path!r} holds no run to resume (no job.json)", path=str(run.root)
        )
    if not resume and run.job.exists() and not (launched and is_launch(run.read_job())):
        raise ConfigError(
            "run_dir", "{field} {path!r} already holds a run; resume it with {resume} or choose a new folder",
            path=str(run.root),
        )  # fmt: skip
    return run


# --------------------------------------------------------------------------- launched by the app


def launch_job(config: DistillConfig) -> dict[str, Any]:
    """job.json as the app writes it before starting the process: the validated config alone
    (the run adds the teacher and its stages when it starts)."""
    return {"config": config.to_dict()}


def is_launch(job: dict[str, Any]) -> bool:
    return set(job) == {"config"}


def launched_config(run_dir: str | Path) -> DistillConfig:
    """The config the app wrote into ``run_dir/job.json``, read strictly."""
    job = RunDir(Path(run_dir)).read_job()
    if not is_launch(job):
        raise WorkbenchError(f"{str(run_dir)!r} holds no launched job (job.json with only a config)")
    try:
        return DistillConfig.from_dict(job["config"])
    except TypeError as err:  # a missing or extra field
        raise WorkbenchError(f"job.json's config does not describe a run: {err}") from None


@dataclass(frozen=True)
class Checked:
    """A config that passed the preflight, with what the preflight worked out."""

    config: DistillConfig
    base: Any  # workbench.models.Base
    specs: list[Any]  # one StudentSpec per stage


def preflight(config: DistillConfig, *, base=None, run_dir: str | Path | None = None,
              resume: bool = False, launched: bool = False) -> Checked:  # fmt: skip
    """Every check a run makes before loading a model, in one order: run folder, fields,
    data, teacher, plans, guidance. ``base`` is the resolved teacher if the caller has it."""
    if run_dir is not None:
        check_run_dir(run_dir, resume, launched)
    validate(config)
    check_data(config)
    base = check_base(config, base)
    specs = check_plans(config, base.unet_config)
    check_guidance(config, specs)
    check_init_student(config, specs)
    return Checked(config, base, specs)
