"""``evaluate``: how well the teacher (and a student) follow prompts, and how close the
student's images stay to the teacher's on the same samples, each with a 95% interval.

On the toy base, prompts are the held-out captions (never seen in training) and the toy
checker judges all five attributes; other bases have no checker and report only the
student's PSNR/SSIM against the teacher. See ``workbench/evaluation.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from workbench import evaluation as ev
from workbench.commands._common import add_base, add_json, emit_json
from workbench.errors import WorkbenchError
from workbench.models import check_unet_folder, load_pipeline, resolve_base
from workbench.schedulers import SCHEDULERS, check_sampler


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="prompt accuracy on held-out toy prompts; with --unet, the student's too and PSNR/SSIM",
    )
    add_base(p)
    p.add_argument("--unet", default=None, help="student UNet folder to compare with the teacher")
    p.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="number of prompts, spread over the list (default: all 81 held-out toy captions, "
        f"or all {len(ev.GENERIC_PROMPTS)} generic prompts on other bases)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per prompt (default {ev.TOY_SEEDS} on the toy, {ev.GENERIC_SEEDS} elsewhere)",
    )
    p.add_argument("--steps", type=int, default=ev.STEPS, help=f"denoising steps (default {ev.STEPS})")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the base's, toy 2, others 5)"
    )
    p.add_argument(
        "--student-scheduler", default="default", choices=SCHEDULERS,
        help="scheduler the student samples with: default (the pipeline's) or lcm (consistency-distilled "
        "students, 1-8 steps); the teacher always uses the pipeline's",
    )  # fmt: skip
    p.add_argument("--student-steps", type=int, default=None, help="the student's steps (default: --steps)")
    p.add_argument(
        "--student-guidance", type=float, default=None,
        help="the student's guidance scale (default: --guidance); a w-conditioned (LCD) student takes it "
        "as an embedding, in one UNet call per step",
    )  # fmt: skip
    p.add_argument(
        "--save", default=None, help="also write the full result, per-sample scores included, as JSON"
    )
    add_json(p)
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    for name in ("prompts", "seeds", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise WorkbenchError(f"--{name} must be a positive integer, got {value}")
    for name in ("guidance", "student_guidance"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise WorkbenchError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.student_steps is not None or args.student_scheduler != "default":
        if not args.unet:
            raise WorkbenchError("--student-scheduler/--student-steps/--student-guidance need --unet")
        steps = args.student_steps if args.student_steps is not None else args.steps
        check_sampler(args.student_scheduler, steps, "--student-steps")
    if args.unet:  # before any model loads: a wrong --unet fails in a blink
        check_unet_folder(args.unet)
    if args.save and Path(args.save).suffix.lower() != ".json":
        raise WorkbenchError(f"--save {args.save!r} must name a .json file")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The full result (``per_sample`` included); see ``evaluation.result``."""
    base = resolve_base(args.base)
    is_toy = base.kind == "toy"
    if not is_toy and not args.unet:
        raise WorkbenchError(
            f"base {base.name!r} has no prompt checker (only the toy has one); give --unet DIR "
            "to compare a student with it"
        )
    samples = ev.default_samples(is_toy, args.prompts, args.seeds)
    # not at the top: workbench.sampling loads diffusers' pipelines and transformers (seconds), which
    # building the CLI's parser (every command's module) must not
    from workbench.sampling import load_student_unet

    pipe = load_pipeline(base)
    student = load_student_unet(args.unet, pipe.unet) if args.unet else None
    guidance = args.guidance if args.guidance is not None else base.guidance
    evaluator = ev.Evaluator(pipe, samples, checker=is_toy, steps=args.steps, guidance=guidance)
    sampler = student_sampler(args, guidance)
    teacher = evaluator.teacher()
    scores = evaluator.student(student, sampler) if student is not None else None
    return ev.result(evaluator, base, teacher, scores, args.unet, sampler)


def student_sampler(args: argparse.Namespace, guidance: float) -> ev.Sampler | None:
    """The student's own way of sampling, if the flags give it one."""
    given = (args.student_steps, args.student_guidance)
    if args.student_scheduler == "default" and all(v is None for v in given):
        return None
    return ev.Sampler(
        steps=args.student_steps if args.student_steps is not None else args.steps,
        guidance=args.student_guidance if args.student_guidance is not None else guidance,
        scheduler=args.student_scheduler,
    )


def run(args: argparse.Namespace) -> int:
    validate(args)
    torch.set_flush_denormal(True)  # tiny models hit denormals, which are slow on CPU
    result = evaluate(args)
    if args.save:
        ev.write_record(args.save, result)
    summary = {k: v for k, v in result.items() if k != "per_sample"}
    if args.json:
        emit_json(summary)
        return 0
    print("\n".join(ev.format_result(summary)))
    if args.save:
        print(f"  per-sample scores: {args.save}")
    return 0
