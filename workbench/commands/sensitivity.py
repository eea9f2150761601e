"""``sensitivity``: what removing each unit alone costs the teacher (cached per model)."""

from __future__ import annotations

import argparse
import sys

import torch

from workbench import latency
from workbench.commands._common import add_base, add_json, emit_json, human
from workbench.models import resolve_base
from workbench.sensitivity import Calibration, sensitivity


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def check_device(device: str) -> str:
    return latency.check_device(device)


def add_calibration(p: argparse.ArgumentParser) -> None:
    d = Calibration()
    g = p.add_argument_group("calibration (each setting is its own cached map)")
    g.add_argument(
        "--prompts", type=int, default=d.prompts, help=f"calibration prompts (default {d.prompts})"
    )
    g.add_argument("--steps", type=int, default=d.steps, help=f"teacher sampling steps (default {d.steps})")
    g.add_argument(
        "--timesteps",
        type=int,
        default=d.timesteps,
        help=f"recorded steps per prompt (default {d.timesteps})",
    )
    g.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the base's, toy 2, others 5)"
    )


def settings_from(args: argparse.Namespace):
    return Calibration(
        prompts=args.prompts, steps=args.steps, timesteps=args.timesteps, guidance=args.guidance
    ).check()


def stderr_progress(quiet: bool = False):
    """A progress callback printing one line per message on stderr (nothing when quiet)."""
    if quiet:
        return None

    def show(fraction: float, message: str) -> None:
        print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    return show


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="per-unit removal cost: prediction deviation (and, on the toy, fidelity and full-prompt drops)",
    )
    add_base(p)
    fid = p.add_mutually_exclusive_group()
    fid.add_argument(
        "--fidelity",
        dest="fidelity",
        action="store_true",
        default=None,
        help="also measure the fidelity and full-prompt drops (default on the toy, the only base with a checker)",
    )
    fid.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help="deviation only (about 5x faster on the toy)",
    )
    add_device(p)
    add_calibration(p)
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json(p)
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    base = resolve_base(args.base)
    device = check_device(args.device)
    torch.set_flush_denormal(True)  # tiny models hit denormals, which are slow on CPU
    smap = sensitivity(
        base,
        settings_from(args),
        fidelity=args.fidelity,
        device=device,
        refresh=args.refresh,
        progress=stderr_progress(args.quiet),
    )
    if args.json:
        emit_json(smap.to_dict() | {"path": smap.path, "from_cache": smap.from_cache})
        return 0
    where = "from cache" if smap.from_cache else f"measured in {smap.seconds:.0f} s"
    print(f"{smap.base}: sensitivity of {len(smap.units)} units ({where}; {smap.samples} samples per score)")
    if smap.teacher_fidelity is not None:
        print(f"  teacher fidelity {smap.teacher_fidelity:.3f}, full-prompt accuracy {smap.teacher_full:.3f}")
    print(f"  {'unit':<52} {'params':>8} {'deviation':>10} {'fid. drop':>9} {'full drop':>9}")
    for unit_id, score in smap.units.items():
        if not score.scored:
            print(f"  {unit_id:<52} {human(score.params):>8} {'-':>10} {'-':>9} {'-':>9}  cannot be removed")
            continue
        drops = [smap.fidelity_drop(unit_id), smap.full_drop(unit_id)]
        drop_s = " ".join("        -" if d is None else f"{d:+9.3f}" for d in drops)
        extra = f"  (with {score.companion})" if score.companion else ""
        dev = f"{score.deviation:.4f}" if score.deviation >= 1e-3 else f"{score.deviation:.1e}"
        print(f"  {unit_id:<52} {human(score.params):>8} {dev:>10} {drop_s}{extra}")
    if smap.path:
        print(f"  cache: {smap.path}")
    return 0
