"""``export``: a student (from a plan, or trained) in one of the export formats, with its model card."""

from __future__ import annotations

import argparse

from workbench import export
from workbench.commands._common import add_json, emit_json, human
from workbench.errors import WorkbenchError
from workbench.lora import check_lora_file
from workbench.models import DEFAULT_BASE, load_pipeline, resolve_base
from workbench.presets import load_preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="save a student as a diffusers folder, a full pipeline, or single .safetensors files",
        description="Formats: " + "; ".join(f"{k}: {v}" for k, v in export.FORMATS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--base",
        default=None,
        help=f"teacher: {DEFAULT_BASE}, a local diffusers folder or a hub id (default: the run's teacher "
        f"for --student, else {DEFAULT_BASE})",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="build the student of this preset or plan file from the teacher")
    source.add_argument("--student", help="a trained run folder (or its student/), or an earlier export")
    p.add_argument("--format", default="diffusers", help=f"one of {', '.join(export.FORMATS)}")
    p.add_argument(
        "--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 for single files, fp32 for folders)"
    )
    p.add_argument(
        "--lora", default=None, help="a LoRA trained on the teacher, remapped into the export's lora/"
    )
    p.add_argument(
        "--evaluate", action="store_true", help="score teacher and student on held-out samples for the card"
    )
    p.add_argument("--eval-prompts", type=int, default=20, help="prompts for --evaluate")
    p.add_argument("--eval-seeds", type=int, default=2, help="seeds per prompt for --evaluate")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    add_json(p)
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    """Everything checkable before a model loads."""
    export.check_format(args.format)
    if args.dtype is not None:
        export.check_dtype(args.dtype)
    export.check_out(args.out)
    if args.evaluate and (args.eval_prompts < 1 or args.eval_seeds < 1):
        raise WorkbenchError("--eval-prompts and --eval-seeds must be positive numbers of prompts and seeds")
    if args.lora:
        check_lora_file(args.lora)


def _check_base(args: argparse.Namespace, base) -> None:
    export.check_base_for(args.format, base)
    if args.evaluate and not base.has_pipeline:
        raise WorkbenchError(
            f"--evaluate draws images, but base {base.name!r} has no pipeline; give a pipeline folder"
        )


def run(args: argparse.Namespace) -> int:
    validate(args)
    if args.student:
        info = export.read_student_folder(args.student)  # a folder without layer_map.json fails here
        base = resolve_base(args.base or info.base_name() or DEFAULT_BASE)
        _check_base(args, base)
        student = export.student_from_folder(args.student, base)
    else:
        base = resolve_base(args.base or DEFAULT_BASE)
        _check_base(args, base)
        student = export.student_from_plan(base, load_preset(args.preset))
    pipe, evaluation = None, None
    if args.evaluate:
        pipe = load_pipeline(base)
        evaluation = export.evaluate(student, pipe, args.eval_prompts, args.eval_seeds)
    result = export.export(
        student, args.format, args.out, args.dtype, pipeline=pipe, evaluation=evaluation, lora_file=args.lora
    )
    spec = student.spec
    if args.json:
        emit_json(
            {"out": str(result.out), "format": result.fmt, "dtype": result.dtype, "files": list(result.files)}
            | spec.summary()
            | ({"lora": result.lora_report.to_dict()} if result.lora_report is not None else {})
        )
        return 0
    what = "trained student" if student.trained else "student"
    print(
        f"saved {what} ({human(spec.student_params)} params) as {args.format} ({result.dtype}) to {result.out}"
    )
    for note in spec.notes:
        print(f"  note: {note}")
    if result.lora_report is not None:
        for line in result.lora_report.lines():
            print(f"  LoRA: {line}")
    return 0
