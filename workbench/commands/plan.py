"""``plan``: what a preset or plan file makes of a base, without loading weights."""

from __future__ import annotations

import argparse

from workbench.catalog import build_catalog
from workbench.commands._common import add_base, add_json, emit_json, human
from workbench.cost import unet_flops
from workbench.models import resolve_base
from workbench.presets import load_preset
from workbench.surgery import compile_plan


def add_preset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="a preset name in presets/ or a path to a plan JSON file")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict a student's config, parameters and FLOPs (no weights loaded)")
    add_base(p)
    add_preset(p)
    p.add_argument(
        "--resolution", type=int, default=None, help="image side in px for FLOPs (default: the model's)"
    )
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    base = resolve_base(args.base)
    plan = load_preset(args.preset)
    catalog = build_catalog(base.unet_config)
    spec = compile_plan(catalog, plan)
    resolution = args.resolution
    if resolution is None:  # 0 is a resolution too, and refused by the FLOP count with the valid step
        resolution = base.unet_config.get("sample_size", 64) * base.vae_scale_factor
    teacher_flops = unet_flops(base.unet_config, resolution, base.vae_scale_factor)
    student_flops = unet_flops(spec.config, resolution, base.vae_scale_factor)
    if args.json:
        emit_json(
            {"base": base.name, "resolution": resolution}
            | spec.summary()
            | {"teacher_flops": teacher_flops, "student_flops": student_flops}
        )
        return 0
    ratio = spec.student_params / spec.teacher_params
    print(f"plan {plan.name!r} on {base.name}: {len(spec.removed)} units removed")
    print(f"  params {human(spec.teacher_params)} -> {human(spec.student_params)} ({ratio:.1%})")
    print(
        f"  FLOPs at {resolution}px {human(teacher_flops)} -> {human(student_flops)} "
        f"({teacher_flops / student_flops:.2f}x fewer)"
    )
    print(f"  student: {spec.topology.describe()}")
    for note in spec.notes:
        print(f"  note: {note}")
    return 0
