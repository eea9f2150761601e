"""``evaluate``: how well the teacher (and a student) follow prompts, and how close
the student's images stay to the teacher's on the same seeds.

On the toy base, prompts are the held-out captions (never seen in training) and
the toy checker judges colour and shape. Other bases have no checker: they report
only student-vs-teacher PSNR/SSIM on a few generic prompts.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from workbench import quality
from workbench.commands._common import add_base, add_json, emit_json
from workbench.errors import WorkbenchError
from workbench.models import check_unet_folder, load_pipeline, resolve_base
from workbench.toy import checker, world

# For bases without a checker: similarity only, so any varied prompts will do.
_GENERIC_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a lighthouse on a cliff at sunset",
    "a watercolor painting of a small village",
    "a close-up portrait of a cat",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="prompt fidelity on held-out toy prompts; with --unet, student fidelity and PSNR/SSIM",
    )
    add_base(p)
    p.add_argument("--unet", default=None, help="student UNet folder to compare with the teacher")
    p.add_argument("--prompts", type=int, default=20, help="number of held-out prompts (default 20)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default 3)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default 5)")
    add_json(p)
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    for name in ("prompts", "seeds", "steps"):
        if getattr(args, name) <= 0:
            raise WorkbenchError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.guidance < 0:
        raise WorkbenchError(f"--guidance must be >= 0, got {args.guidance}")
    if args.unet:  # before any model loads: a wrong --unet fails in a blink
        check_unet_folder(args.unet)


def _prompts(is_toy: bool, n_prompts: int, seeds: int) -> tuple[list[str], list[int]]:
    if is_toy:
        pairs = world.evaluation_set(n_prompts, seeds)
        return [scene.caption for scene, _ in pairs], [seed for _, seed in pairs]
    chosen = [_GENERIC_PROMPTS[i % len(_GENERIC_PROMPTS)] for i in range(n_prompts)]
    return [p for p in chosen for _ in range(seeds)], [s for _ in chosen for s in range(seeds)]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    base = resolve_base(args.base)
    is_toy = base.kind == "toy"
    if not is_toy and not args.unet:
        raise WorkbenchError(
            f"base {base.name!r} has no prompt checker (only the toy has one); give --unet DIR "
            "to compare a student with it"
        )
    from workbench.sampling import generate, load_student_unet  # heavy: only when evaluating

    pipe = load_pipeline(base)
    student = load_student_unet(args.unet, pipe.unet) if args.unet else None
    prompts, seeds = _prompts(is_toy, args.prompts, args.seeds)
    settings = {"steps": args.steps, "guidance": args.guidance}
    teacher_images = generate(pipe, prompts, seeds, **settings)
    result: dict[str, Any] = {"base": base.name, "samples": len(prompts), **settings}
    result["fidelity"] = checker.fidelity(teacher_images, prompts) if is_toy else None
    if student is not None:
        student_images = generate(pipe, prompts, seeds, unet=student, **settings)
        result["unet"] = str(args.unet)
        if is_toy:
            result["student_fidelity"] = checker.fidelity(student_images, prompts)
        result |= quality.compare(student_images, teacher_images)
    return result


def run(args: argparse.Namespace) -> int:
    validate(args)
    torch.set_flush_denormal(True)  # tiny models hit denormals, which are slow on CPU
    result = evaluate(args)
    if args.json:
        emit_json(result)
        return 0
    print(f"{result['base']}: {result['samples']} samples, {args.steps} steps, guidance {args.guidance}")
    if result["fidelity"] is not None:
        print(f"  teacher fidelity  {result['fidelity']:.3f}  (held-out prompts judged right)")
    if "student_fidelity" in result:
        print(f"  student fidelity  {result['student_fidelity']:.3f}")
    if "psnr" in result:
        print(f"  student vs teacher: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.3f}")
    return 0
