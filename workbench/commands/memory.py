"""``memory``: will a distillation run fit on a GPU? Its peak memory, without allocating."""

from __future__ import annotations

import argparse

from workbench import memory, memory_advice
from workbench.commands._common import add_base, add_json, emit_json
from workbench.distill_config import (
    OPTIMIZERS,
    PRECISIONS,
    STAGE_TEACHERS,
    TEACHER_DTYPES,
    TEACHER_TARGETS,
    DistillConfig,
    stage_fields,
)
from workbench.errors import WorkbenchError
from workbench.surgery import FEATURE_MODES

# CLI flag -> DistillConfig field: the options the estimate depends on.
_OPTIONS: list[tuple[str, type, str]] = [
    ("--resolution", int, "training resolution in px (default: the teacher's)"),
    ("--batch-size", int, "batch per process"),
    ("--grad-accum", int, "gradient accumulation steps"),
    ("--w-out", float, "weight of the output KD loss (0 with no feature loss: no teacher forward)"),
    ("--w-feat", float, "weight of the feature KD loss (0: no feature hooks)"),
    ("--lora-rank", int, "LoRA-enhanced distillation with adapters of this rank (0: full weights)"),
    (
        "--lcd-lora-rank",
        int,
        "lcd: LCM-LoRA adapters of this rank on the frozen student (0: full weights with the guidance "
        "embedding)",
    ),
    (
        "--sample-every",
        int,
        "sample grids every N steps (they bring the parked pipeline back; 0: at the end)",
    ),
]
_CHOICES: list[tuple[str, tuple[str, ...]]] = [
    ("--feature-mode", FEATURE_MODES),
    ("--mixed-precision", PRECISIONS),
    ("--teacher-dtype", tuple(TEACHER_DTYPES)),
    ("--stage-teacher", STAGE_TEACHERS),
    ("--optimizer", OPTIMIZERS),
    ("--teacher-targets", TEACHER_TARGETS),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="estimate a distillation run's peak GPU memory (fake tensors: nothing allocated)"
    )
    add_base(p)
    p.add_argument("--preset", help="the plan: a preset name or plan file (one stage)")
    p.add_argument(
        "--stages",
        help="progressive run: comma-separated presets/plan files; 'lcd' as the last adds a latent "
        "consistency distillation stage on the previous plan (e.g. segmind-vega,lcd)",
    )
    p.add_argument("--objective", help="with --preset: what the one stage optimises: kd (default) or lcd")
    for flag, kind, text in _OPTIONS:
        p.add_argument(flag, type=kind, help=text)
    for flag, choices in _CHOICES:
        p.add_argument(flag, help=", ".join(choices))
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--target",
        default="cuda",
        help="whose memory rules: cuda (default: what the GPU verdicts are for) or cpu (as measured here)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="processes sharing the student under FSDP (workbench/configs/accelerate-fsdp.yaml): the "
        "estimate per process (default 1: one process, or each DDP process)",
    )
    p.add_argument(
        "--no-suggest", action="store_true", help="skip the search for options that make the run fit"
    )
    add_json(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    if bool(args.preset) == bool(args.stages):
        raise WorkbenchError("give exactly one of --preset (one stage) or --stages (comma-separated presets)")
    if args.objective and not args.preset:
        raise WorkbenchError("--objective goes with --preset; with --stages, end the list with lcd")
    names = [args.preset] if args.preset else [s.strip() for s in args.stages.split(",") if s.strip()]
    fields: dict = stage_fields(names, args.objective) | {"steps": 1, "base": args.base}
    for flag, *_ in (*_OPTIONS, *_CHOICES):
        key = flag[2:].replace("-", "_")
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    fields["gradient_checkpointing"] = args.gradient_checkpointing
    return DistillConfig(**fields)


def run(args: argparse.Namespace) -> int:
    memory.check_device(args.target)
    config = config_from_args(args)
    result = memory.estimate(config, args.target, ranks=args.ranks)
    hints = None if args.no_suggest else memory.suggestions(config, result)
    if args.json:
        emit_json(result.to_dict() | {"suggestions": hints})
    else:
        print(memory_advice.report(result, hints))
    return 0
