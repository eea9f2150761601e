"""``autoprune``: the least damaging valid plan that meets a parameter/FLOP/latency budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from workbench.autoprune import autoprune
from workbench.commands._common import add_base, add_json, emit_json, human
from workbench.commands.sensitivity import (
    add_calibration,
    add_device,
    check_device,
    settings_from,
    stderr_progress,
)
from workbench.dtypes import fast_dtype
from workbench.presets import check_name, save_preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("autoprune", help="choose a plan for a budget from the sensitivity map")
    add_base(p)
    p.add_argument("--target-params", type=float, help="keep at most this fraction of the parameters")
    p.add_argument("--target-flops", type=float, help="keep at most this fraction of the FLOPs")
    p.add_argument(
        "--target-latency", type=float, help="keep at most this fraction of the estimated latency (profiles)"
    )
    p.add_argument("--method", default="rescored", help="rescored (default: measures candidates) or static")
    p.add_argument("--candidates", type=int, default=8, help="moves measured per step (rescored; default 8)")
    p.add_argument("--resolution", type=int, help="px for the FLOP/latency budget (default: the model's)")
    add_device(p)
    add_calibration(p)
    p.add_argument("--name", default="auto", help="the plan's name (default auto)")
    p.add_argument("--out", help="write the plan JSON here")
    p.add_argument("--save-preset", metavar="NAME", help="save the plan as presets/NAME.json")
    p.add_argument("--overwrite", action="store_true", help="let --save-preset replace an existing preset")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    targets = {"params": args.target_params, "flops": args.target_flops, "latency": args.target_latency}
    check_name(args.name, "plan")
    if args.save_preset:
        check_name(args.save_preset)
    device = check_device(args.device)
    dtype = fast_dtype(device)  # what a latency budget is profiled in
    if args.target_latency is not None and not args.quiet:
        print(dtype.describe(), file=sys.stderr)
    torch.set_flush_denormal(True)
    result, _ = autoprune(
        args.base,
        targets,
        method=args.method,
        settings=settings_from(args),
        resolution=args.resolution,
        device=device,
        dtype=dtype.name,
        candidates=args.candidates,
        name=args.save_preset or args.name,
        progress=stderr_progress(args.quiet),
    )
    out = result.to_dict(args.base)
    if args.out:
        out["out"] = str(result.spec.plan.save(Path(args.out)))
    if args.save_preset:
        out["preset"] = str(save_preset(result.spec.plan, args.save_preset, overwrite=args.overwrite))
    if args.json:
        emit_json(out)
        return 0
    spec = result.spec
    fr = ", ".join(f"{k} {v:.3f} (target {out['targets'][k]:g})" for k, v in out["fractions"].items())
    print(f"{args.base}: {args.method} auto-prune kept {fr}")
    print(f"  params {human(spec.teacher_params)} -> {human(spec.student_params)}")
    if result.deviation is not None:
        print(f"  deviation {result.deviation:.4f} (relative MSE of the UNet's prediction)")
    print(f"  estimated cost {result.estimated_cost:.4f} (sum of lone-removal deviations)")
    print(f"  student: {spec.topology.describe()}")
    print(f"  removes: {', '.join(spec.plan.removed)}")
    for note in spec.notes:
        print(f"  note: {note}")
    for key in ("out", "preset"):
        if key in out:
            print(f"  wrote {out[key]}")
    if not (args.out or args.save_preset):
        print("  keep it with --out FILE or --save-preset NAME (or --json for the plan itself)")
    return 0
