"""``latency``: a student's measured speedup over its teacher, beside the FLOP ratio and estimate."""

from __future__ import annotations

import argparse
import sys

from workbench.commands._common import add_base, add_json, emit_json
from workbench.commands.plan import add_preset
from workbench.dtypes import fast_dtype
from workbench.errors import WorkbenchError
from workbench.latency import DTYPES, check_device, latency_setup, measure_speedup
from workbench.presets import load_preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "latency",
        help="time a student against its teacher (random weights for config-only bases)",
    )
    add_base(p)
    add_preset(p)
    p.add_argument(
        "--resolution", type=int, default=None, help="image side in px (default: 512 on cpu, native on cuda)"
    )
    # Checked by workbench.latency (not argparse choices) so every mistake is one clear line.
    p.add_argument(
        "--dtype",
        default=None,
        help=f"{' | '.join(DTYPES)} (default: the device's fast dtype, fp32 on cpu, bf16 on cuda or fp16 "
        "without bf16 support; fp16 needs cuda)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards of each model (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards of each model first (default 2)")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise WorkbenchError(f"--repeats {args.repeats} must be at least 1")
    device = check_device(args.device)
    choice = fast_dtype(device) if args.dtype is None else None
    dtype = choice.name if choice else args.dtype
    latency_setup(args.base, device, dtype, args.resolution, args.batch)  # every option checked first:
    load_preset(args.preset)  # a mistake is one line, with no note before it
    if choice:
        print(choice.describe(), file=sys.stderr)  # stderr: --json output stays one JSON document
    result = measure_speedup(
        args.base,
        args.preset,
        device=device,
        dtype=dtype,
        resolution=args.resolution,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    if args.json:
        emit_json(result)
        return 0
    r = result
    print(
        f"{r['plan']} on {r['base']} ({r['weights']} weights), {r['device_name']} {r['dtype']}, "
        f"{r['resolution']} px, batch {r['batch']}, median of {r['repeats']} interleaved runs"
    )
    print(f"  teacher {r['teacher_s']:.3f} s (spread {r['teacher_spread']:.0%})")
    print(f"  student {r['student_s']:.3f} s (spread {r['student_spread']:.0%})")
    print(
        f"  speedup {r['speedup']:.2f}x (spread {r['speedup_spread']:.0%})   FLOP ratio {r['flops_ratio']:.2f}x"
    )
    print(
        f"  estimate {r['estimated_student_s']:.3f} s ({r['estimated_speedup']:.2f}x), "
        f"error {r['estimate_error']:+.1%} at this run's teacher time"
    )
    return 0
