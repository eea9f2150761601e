"""``memory``: will a distillation run fit on a GPU? Its peak memory, without allocating."""

from __future__ import annotations

import argparse

from workbench import memory, memory_advice
from workbench.commands._common import (
    add_base,
    add_config_options,
    add_json,
    add_stage_options,
    config_options,
    emit_json,
    stage_options,
)
from workbench.distill_config import DistillConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="estimate a distillation run's peak GPU memory (fake tensors: nothing allocated)"
    )
    add_base(p)
    add_stage_options(p)
    add_config_options(p, memory_only=True)  # the options the estimate depends on, from their declarations
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
    fields = stage_options(args, required=True) | {"steps": 1, "base": args.base}
    return DistillConfig(**(fields | config_options(args)))


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
