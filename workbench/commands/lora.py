"""``lora``: move a LoRA trained on the teacher onto a student, through its layer map."""

from __future__ import annotations

import argparse

from workbench import export, lora
from workbench.catalog import build_catalog
from workbench.commands._common import add_json, emit_json
from workbench.models import DEFAULT_BASE, resolve_base
from workbench.presets import load_preset
from workbench.surgery import compile_plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora",
        help="remap a teacher LoRA onto a student (renamed through the layer map; removed modules dropped)",
    )
    p.add_argument(
        "--lora", required=True, help="the teacher's LoRA (.safetensors; diffusers/peft or kohya naming)"
    )
    p.add_argument(
        "--base",
        default=None,
        help=f"the teacher (default: the run's teacher for --student, else {DEFAULT_BASE})",
    )
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--preset", help="the student of this preset or plan file")
    student.add_argument("--student", help="a run folder or exported student folder (with layer_map.json)")
    p.add_argument("--out", required=True, help="output folder for the remapped LoRA (new or empty)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export.check_out(args.out)
    lora.check_lora_file(args.lora)
    if args.student:
        info = export.read_student_folder(args.student)
        base = resolve_base(args.base or info.base_name() or DEFAULT_BASE)
        layer_map = info.layer_map
    else:
        base = resolve_base(args.base or DEFAULT_BASE)
        layer_map = compile_plan(build_catalog(base.unet_config), load_preset(args.preset)).layer_map
    teacher_lora = lora.read_lora(args.lora, base)
    pairs, report = lora.remap(teacher_lora, layer_map)
    path = lora.save_lora(teacher_lora, pairs, report, args.out)
    if args.json:
        emit_json({"out": str(path)} | report.to_dict())
        return 0
    for line in report.lines():
        print(line)
    print(f"saved the student's LoRA to {path} (load it with pipe.load_lora_weights)")
    return 0
