"""``distill``: train a pruned student against its teacher (also under ``accelerate launch``)."""

from __future__ import annotations

import argparse

from workbench.commands._common import add_base, emit_json
from workbench.distill import run_distillation
from workbench.distill_config import (
    FEATURE_MODES,
    FEATURE_WEIGHTS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    STAGE_TEACHERS,
    TEACHER_DTYPES,
    TEACHER_TARGETS,
    DistillConfig,
    stage_fields,
)
from workbench.errors import WorkbenchError
from workbench.losses import LCD_LOSSES
from workbench.trackers import REPORT_TO

# CLI flag -> DistillConfig field, for the plain options.
_OPTIONS: list[tuple[str, type, str]] = [
    (
        "--data",
        str,
        "training data: toy (default), an image folder (metadata.jsonl or .txt captions), or a .txt prompt file",
    ),
    ("--toy-samples", int, "number of toy images to render and cache (toy data)"),
    ("--resolution", int, "training resolution in px (default: the teacher pipeline's)"),
    ("--batch-size", int, "batch per process"),
    ("--grad-accum", int, "gradient accumulation steps"),
    ("--lr", float, "learning rate (AdamW)"),
    ("--warmup-steps", int, "linear learning-rate warm-up steps"),
    ("--weight-decay", float, "AdamW weight decay"),
    ("--max-grad-norm", float, "gradient clipping norm (0 disables)"),
    ("--w-task", float, "weight of the task loss (noise / v MSE)"),
    ("--w-out", float, "weight of the output KD loss"),
    ("--w-feat", float, "weight of the summed feature KD loss"),
    ("--uncond-prob", float, "probability of dropping the prompt (classifier-free guidance)"),
    ("--seed", int, "seed of data order, noise and timesteps"),
    ("--log-every", int, "write a metrics row every N steps"),
    ("--checkpoint-every", int, "checkpoint every N steps"),
    ("--keep-checkpoints", int, "keep the last N checkpoints"),
    ("--sample-every", int, "teacher-vs-student sample grid every N steps (0: at the end only)"),
    ("--sample-steps", int, "denoising steps for sample grids"),
    ("--sample-guidance", float, "guidance scale for sample grids (default: the base's, toy 2, others 5)"),
    (
        "--teacher-image-steps",
        int,
        "prompt-file data (--data prompts.txt): denoising steps the teacher draws each training image with, "
        "at the run's --resolution",
    ),
    (
        "--teacher-image-guidance",
        float,
        "prompt-file data: guidance scale the teacher draws training images with (default: the base's, toy 2, "
        "others 5)",
    ),
    (
        "--init-student",
        str,
        "stage 1's student starts from this trained student (a run folder or a UNet folder of stage 1's "
        "architecture) instead of the teacher's kept weights, e.g. --objective lcd on a kd run's student",
    ),
    (
        "--lcd-guidance-min",
        float,
        "lcd: lowest guidance scale drawn for the teacher (default: 0.75 x the base's, at least 1)",
    ),
    (
        "--lcd-guidance-max",
        float,
        "lcd: highest guidance scale drawn for the teacher (default: 1.5 x the base's)",
    ),
    ("--lcd-ema", float, "lcd: decay of the EMA target network (default 0.95)"),
    ("--lcd-huber-c", float, "lcd: the pseudo-Huber loss's c (default 0.001)"),
    ("--lcd-sample-steps", int, "lcd: LCM steps of the sample grids (1-8, default 4)"),
    (
        "--lcd-lora-rank",
        int,
        "lcd: LCM-LoRA, adapters of this rank on the student (no guidance embedding), also saved as "
        "RUN_DIR/lcm_lora for load_lora_weights (0, default: full weights with the guidance embedding)",
    ),
    (
        "--lcd-reward",
        str,
        "lcd: reward guidance (RG-LCD) of the one-step prediction: a reward folder, toy (the shipped "
        "proxy of the toy checker), or a differentiable scorer (latents, cond) -> (B,) as "
        "path/to/file.py:name or package.module:name (needs --lcd-reward-weight)",
    ),
    ("--lcd-reward-weight", float, "lcd: weight of the reward term, loss - weight x mean reward (e.g. 0.1)"),
    (
        "--freeze-sensitive",
        int,
        "freeze the student modules of the N most sensitive kept teacher layers (sensitivity map; "
        "ties: earliest first); 0 (default) freezes nothing",
    ),
    (
        "--lora-rank",
        int,
        "LoRA-enhanced distillation: adapters of this rank where a layer's input is unchanged, full "
        "weights where the plan changed it; merged for export (0, default: full weights everywhere)",
    ),
]
_CHOICES: list[tuple[str, tuple[str, ...], str]] = [
    (
        "--feature-mode",
        FEATURE_MODES,
        "feature KD: layer (every kept ResNet/attention), block, self-attention, none",
    ),
    (
        "--feature-weights",
        FEATURE_WEIGHTS,
        "weight of each feature KD term: uniform (default) or by the sensitivity of the teacher "
        "layer it matches (measured once per teacher and cached; weights average 1)",
    ),
    ("--lr-schedule", LR_SCHEDULES, "learning-rate schedule"),
    (
        "--stage-teacher",
        STAGE_TEACHERS,
        "who teaches stage 2+: the original teacher or the previous stage's student",
    ),
    ("--mixed-precision", PRECISIONS, "student mixed precision (fp16 needs CUDA)"),
    ("--teacher-dtype", TEACHER_DTYPES, "teacher precision (it runs without gradients)"),
    ("--device", ("auto", "cpu", "cuda"), "where to train"),
    ("--optimizer", OPTIMIZERS, "adamw, or adamw8bit (bitsandbytes: a quarter of AdamW's state memory)"),
    ("--lcd-loss", LCD_LOSSES, "lcd: huber (pseudo-Huber, default) or l2"),
    (
        "--teacher-targets",
        TEACHER_TARGETS,
        "live (default): the teacher runs beside the student at every step; precompute: its outputs "
        "and features are written to the run folder before a stage's student steps and read back, so "
        "the teacher is off the GPU while the student trains (disk: see `python -m workbench memory`)",
    ),
    (
        "--report-to",
        REPORT_TO,
        "also log config, losses and sample grids to a tracker (tensorboard: RUN/trackers)",
    ),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a pruned student from its teacher (layer-level KD)")
    add_base(p)
    p.set_defaults(base=None)  # given or not: with --resume, a given --base must match the run's
    p.add_argument("--preset", help="the plan: a preset name or plan file (one stage)")
    p.add_argument(
        "--stages",
        help="progressive run: comma-separated presets/plan files, each removing more; 'lcd' as the last "
        "adds a latent consistency distillation stage on the previous plan (e.g. segmind-vega,lcd)",
    )
    p.add_argument(
        "--objective",
        help="with --preset: what the one stage optimises: kd (block-removal KD, default) or lcd (latent "
        "consistency distillation straight from the teacher)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per stage")
    p.add_argument("--run-dir", required=True, help="the run folder (created; with --resume, continued)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    # Flags default to None (so that a flag given with --resume is a change); help says the run's default.
    for flag, kind, text in _OPTIONS:
        p.add_argument(flag, type=kind, help=_with_default(flag, text))
    for flag, choices, text in _CHOICES:  # validated with a clear message
        p.add_argument(flag, help=_with_default(flag, f"{text} ({', '.join(choices)})"))
    p.add_argument(
        "--normalize-features",
        action="store_true",
        help="divide each feature term by the teacher feature's mean square",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--sample-prompt", action="append", help="prompt for sample grids (repeatable)")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p.set_defaults(func=run)


def _with_default(flag: str, text: str) -> str:
    default = DistillConfig.defaults().get(flag[2:].replace("-", "_"))
    if "default" in text or default is None:
        return text
    return f"{text} (default: {default})"


def given_fields(args: argparse.Namespace) -> dict:
    """The DistillConfig fields the flags set (flags not given are left out)."""
    fields: dict = {}
    if args.preset or args.stages:
        if args.preset and args.stages:
            raise WorkbenchError(
                "give one of --preset (one stage) or --stages (comma-separated presets), not both"
            )
        names = [args.preset] if args.preset else [s.strip() for s in args.stages.split(",") if s.strip()]
        fields |= stage_fields(names, args.objective if args.preset else None)
    elif args.objective:
        raise WorkbenchError("--objective goes with --preset; with --stages, end the list with lcd")
    for name in ("steps", "base", *(flag[2:].replace("-", "_") for flag, *_ in (*_OPTIONS, *_CHOICES))):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name in ("normalize_features", "gradient_checkpointing"):
        if getattr(args, name):
            fields[name] = True
    if args.sample_prompt:
        fields["sample_prompts"] = tuple(args.sample_prompt)
    return fields


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """A DistillConfig from CLI flags (unset flags keep the defaults)."""
    fields = given_fields(args)
    if "stages" not in fields:
        raise WorkbenchError("give one of --preset (one stage) or --stages (comma-separated presets)")
    return DistillConfig(**({"steps": None} | fields))


def run(args: argparse.Namespace) -> int:
    if args.resume:  # the run's own options; flags given too are changes (more --steps, or refused)
        status = run_distillation(None, args.run_dir, resume=True, changes=given_fields(args))
    else:
        status = run_distillation(config_from_args(args), args.run_dir)
    if status.get("main") is False:  # other ranks of `accelerate launch` stay quiet
        pass
    elif args.json:
        emit_json(status)
    else:
        print(f"run {status['state']} at step {status.get('step')} in {args.run_dir}")
    return 0 if status["state"] in ("done", "stopped") else 1
