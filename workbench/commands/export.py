"""``export``: a student (from a plan, or trained) in one of the export formats, with its model card."""

from __future__ import annotations

import argparse
from dataclasses import replace

from workbench import export, quantize
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
        "--quantize",
        default=None,
        help=f"quantise the UNet's Linear weights with torchao ({', '.join(quantize.SCHEMES)}; diffusers "
        "format only; --dtype is then the compute dtype of the rest)",
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
    if args.quantize:
        _check_quantize(args)
    if args.evaluate and (args.eval_prompts < 1 or args.eval_seeds < 1):
        raise WorkbenchError("--eval-prompts and --eval-seeds must be positive numbers of prompts and seeds")
    if args.lora:
        check_lora_file(args.lora)


def _check_quantize(args: argparse.Namespace) -> None:
    """A quantised export a client cannot load is refused here, before anything loads."""
    if args.format != "diffusers":
        raise WorkbenchError(
            f"--quantize writes the diffusers format only: the {args.format} layout has no place for "
            "torchao's packed weights or its quantization config; pass --format diffusers"
        )
    if args.lora:
        raise WorkbenchError("--lora with --quantize: export the LoRA with an unquantised student")
    if args.evaluate and (args.dtype or quantize.default_dtype(args.quantize)) != "fp32":
        raise WorkbenchError(
            "--evaluate with --quantize samples the quantised student in the CPU pipeline (fp32): "
            "leave --dtype out (fp32), or export without --evaluate"
        )
    if args.student and quantize.read_quantization(export.read_student_folder(args.student).unet_dir):
        raise WorkbenchError(f"{args.student!r} is already quantised; give the unquantised student")
    quantize.check_scheme(args.quantize, args.dtype)


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
    if args.quantize:
        return _run_quantized(args, student, pipe)
    if args.evaluate:
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


def _run_quantized(args: argparse.Namespace, student, pipe) -> int:
    """Quantise, score the quantised student (--evaluate: the card's figures, and its cost beside
    the unquantised one), then write it."""
    quantized = quantize.quantize_unet(student.unet, args.quantize, args.dtype)
    evaluation, cost = None, None
    if pipe is not None:
        evaluation = export.evaluate(
            replace(student, unet=quantized), pipe, args.eval_prompts, args.eval_seeds
        )
        cost = quantize.compare(student.unet, quantized, args.quantize, repeats=3)
    result = quantize.export_quantized(
        student, args.quantize, args.out, args.dtype, evaluation=evaluation, quantized=quantized
    )
    if args.json:
        emit_json(
            {"out": str(result.out), "format": "diffusers", "quantize": result.scheme, "dtype": result.dtype,
             "quantized_share": round(result.share, 4), "weights_bytes": result.weights_bytes,
             "library": result.library, "files": list(result.files)}
            | ({"cost": cost.to_dict()} if cost else {}) | student.spec.summary()
        )  # fmt: skip
        return 0
    print(
        f"saved {'trained student' if student.trained else 'student'} quantised {result.scheme} "
        f"({result.library}; {result.share:.1%} of the parameters, the Linear weights; the rest "
        f"{result.dtype}) to {result.out}: weights {result.weights_bytes / 1e6:,.1f} MB"
    )
    for line in quantize.cost_lines(cost) if cost else ():
        print(f"  {line}")
    return 0
