"""``lora``: move a LoRA trained on the teacher onto a student, through its layer map."""

from __future__ import annotations

import argparse

from workbench import export, lora
from workbench.catalog import build_catalog
from workbench.commands._common import add_json, emit_json
from workbench.modelcard import recorded_teacher
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
        help="the teacher (default: for --student, the teacher its run or export records; "
        f"for --preset, {DEFAULT_BASE})",
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
    teacher_from = "--base" if args.base else "the default"
    if args.student:
        info = export.read_student_folder(args.student)
        name, teacher_from = _student_teacher(args.base, info)
        base = resolve_base(name)
        layer_map, student_config = info.layer_map, info.config
    else:
        base = resolve_base(args.base or DEFAULT_BASE)
        spec = compile_plan(build_catalog(base.unet_config), load_preset(args.preset))
        layer_map, student_config = spec.layer_map, spec.config
    teacher_lora = lora.read_lora(args.lora, base)
    pairs, report = lora.remap(teacher_lora, layer_map)
    path = lora.save_lora(teacher_lora, pairs, report, args.out, student_config=student_config)
    if args.json:
        emit_json({"out": str(path), "teacher": base.name, "teacher_from": teacher_from} | report.to_dict())
        return 0
    print(f"teacher: {base.name} (from {teacher_from})")
    for line in report.lines():
        print(line)
    print(f"saved the student's LoRA to {path} (load it with pipe.load_lora_weights)")
    return 0


def _student_teacher(given: str | None, info: export.StudentFolder) -> tuple[str, str]:
    """The teacher for a student folder, and where it came from: --base, the run's job.json,
    or what the export records (its card or weights metadata)."""
    if given:
        return given, "--base"
    if info.base_name():
        return info.base_name(), "the run's job.json"
    return recorded_teacher(info.unet_dir)
