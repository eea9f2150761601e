"""``distill``: train a pruned student against its teacher (also under ``accelerate launch``)."""

from __future__ import annotations

import argparse

from workbench.commands._common import (
    add_base,
    add_config_options,
    add_stage_options,
    config_options,
    emit_json,
    stage_options,
)
from workbench.distill import run_distillation
from workbench.distill_config import DistillConfig
from workbench.errors import WorkbenchError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a pruned student from its teacher (layer-level KD)")
    add_base(p)
    p.set_defaults(base=None)  # given or not: with --resume, a given --base must match the run's
    add_stage_options(p)
    p.add_argument("--steps", type=int, help="optimizer steps per stage")
    p.add_argument("--run-dir", required=True, help="the run folder (created; with --resume, continued)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    p.add_argument(
        "--from-job", action="store_true",
        help="start the run whose validated config the app wrote into --run-dir/job.json (no other flags)",
    )  # fmt: skip
    add_config_options(p)  # one flag per DistillConfig option, from its declaration
    p.add_argument("--sample-prompt", action="append", help="prompt for sample grids (repeatable)")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p.set_defaults(func=run)


def given_fields(args: argparse.Namespace) -> dict:
    """The DistillConfig fields the flags set (flags not given are left out)."""
    fields = stage_options(args, required=False) | config_options(args)
    for name in ("steps", "base"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.sample_prompt:
        fields["sample_prompts"] = tuple(args.sample_prompt)
    return fields


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """A DistillConfig from CLI flags (unset flags keep the defaults)."""
    fields = given_fields(args)
    if "stages" not in fields:
        stage_options(args, required=True)  # says which flags are missing
    return DistillConfig(**({"steps": None} | fields))


def run(args: argparse.Namespace) -> int:
    if args.resume:  # the run's own options; flags given too are changes (more --steps, or refused)
        status = run_distillation(None, args.run_dir, resume=True, changes=given_fields(args))
    elif args.from_job:  # the app's launch: the config it validated, read strictly
        if given := given_fields(args):
            raise WorkbenchError(f"--from-job takes the config from job.json; leave out {', '.join(sorted(given))}")
        status = run_distillation(None, args.run_dir, from_job=True)
    else:
        status = run_distillation(config_from_args(args), args.run_dir)
    if status.get("main") is False:  # other ranks of `accelerate launch` stay quiet
        pass
    elif args.json:
        emit_json(status)
    else:
        print(f"run {status['state']} at step {status.get('step')} in {args.run_dir}")
    return 0 if status["state"] in ("done", "stopped") else 1
