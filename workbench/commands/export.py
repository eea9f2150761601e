"""``export``: build a student from a base's weights and save it as a diffusers UNet folder."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from workbench.catalog import build_catalog
from workbench.commands._common import add_base, add_json, emit_json, human
from workbench.commands.plan import add_preset
from workbench.errors import WorkbenchError
from workbench.models import load_unet, resolve_base
from workbench.presets import load_preset
from workbench.surgery import build_student, compile_plan, save_student


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="build a student from the teacher's weights and save it (diffusers folder)"
    )
    add_base(p)
    add_preset(p)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WorkbenchError(
            f"--out {str(out)!r} already exists and is not an empty folder; choose a new one"
        )
    base = resolve_base(args.base)
    plan = load_preset(args.preset)
    spec = compile_plan(build_catalog(base.unet_config), plan)  # reject bad plans before loading weights
    student, spec = build_student(load_unet(base), plan)
    # Write beside the target, then move: a crash never leaves a half-written student.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_student(student, spec, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        emit_json({"out": str(out)} | spec.summary())
    else:
        print(f"saved student ({human(spec.student_params)} params) to {out}")
        for note in spec.notes:
            print(f"  note: {note}")
    return 0
