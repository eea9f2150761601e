"""Auto-prune on the toy: does a sensitivity-chosen plan beat a hand-made preset?

For one budget (default: the parameter fraction of a preset on this base, so the sizes
match) this script:

1. measures (or reads from cache) the full sensitivity map, with the fidelity drop;
2. runs both searches, ``static`` and ``rescored``, timing each;
3. scores the undistilled students of the preset and both auto plans: deviation on the
   calibration calls (what the search minimises), and on held-out prompts the toy
   checker's fidelity and PSNR/SSIM against the teacher's images (never seen by the search);
4. distils each student for the same steps with the same settings (layer-level KD) and
   scores them again.

    python benchmarks/autoprune.py [--budget 0.29] [--preset segmind-vega] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from workbench import autoprune as ap
from workbench.catalog import build_catalog
from workbench.commands.evaluate import evaluate
from workbench.distill import DistillConfig, run_distillation
from workbench.models import load_unet, resolve_base
from workbench.presets import load_preset
from workbench.sensitivity import Probe, sensitivity
from workbench.surgery import build_student, compile_plan, save_student


def score(args, unet_dir: Path) -> dict:
    ns = argparse.Namespace(base=args.base, unet=str(unet_dir), prompts=args.prompts, seeds=args.seeds,
                            steps=20, guidance=5.0)  # fmt: skip
    return evaluate(ns)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--preset", default="segmind-vega", help="the hand-made plan to compare with")
    p.add_argument("--budget", type=float, default=None, help="params fraction (default: the preset's)")
    p.add_argument("--candidates", type=int, default=ap.CANDIDATES)
    p.add_argument("--steps", type=int, default=400, help="distillation steps per student (0: skip)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=1024, help="cached toy training images")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--refresh-map", action="store_true", help="measure the sensitivity map again")
    p.add_argument("--out", default="runs/autoprune")
    return p.parse_args()


def run_searches(args, base, catalog, budget: float, tag: str, report: dict) -> tuple[dict, Probe]:
    """The sensitivity map, then both searches at the budget: (plans by name, probe)."""
    started = time.perf_counter()
    smap = sensitivity(base, fidelity=True, refresh=args.refresh_map, progress=lambda f, m: None)
    report["map"] = {"seconds_measured": smap.seconds, "from_cache": smap.from_cache,
                     "seconds_now": time.perf_counter() - started, "units": len(smap.units),
                     "scored": sum(u.scored for u in smap.units.values())}  # fmt: skip
    log(f"sensitivity map: {report['map']}")
    probe = Probe(base)
    plans = {}
    report["search"] = {}
    for method in ("static", "rescored"):
        t0 = time.perf_counter()
        result = ap.search(catalog, [ap.budget("params", budget, catalog)], smap, method=method, probe=probe,
                           candidates=args.candidates, name=f"auto-{method}-{tag}")  # fmt: skip
        report["search"][method] = {"seconds": time.perf_counter() - t0, "evaluations": result.evaluations,
                                    "removed": list(result.spec.plan.removed)}  # fmt: skip
        plans[f"auto-{method}"] = result.spec.plan
        log(f"{method}: {report['search'][method]['seconds']:.1f} s, {result.evaluations} evaluations")
    return plans, probe


def score_plan(args, teacher, catalog, probe, name: str, plan, folder: Path) -> dict:
    """One student's row: params, deviation, and scores before (and after) distillation."""
    spec = compile_plan(catalog, plan)
    if not (folder / "undistilled" / "config.json").exists():
        student, _ = build_student(teacher, plan)
        save_student(student, spec, folder / "undistilled")
    row = {"student": name, "params": spec.student_params, "fraction": spec.student_params / spec.teacher_params,
           "deviation": probe.deviation(plan.removed)}  # fmt: skip
    row["undistilled"] = score(args, folder / "undistilled")
    log(f"{name} undistilled: {json.dumps(row)}")
    if args.steps:
        run_dir = folder / f"distill-{args.steps}"
        if not (run_dir / "student" / "config.json").exists():
            config = DistillConfig(
                stages=(plan.to_dict(),), steps=args.steps, base=args.base, toy_samples=args.samples,
                batch_size=args.batch_size, lr=args.lr, checkpoint_every=max(50, args.steps // 4),
                log_every=10, seed=0, device="cpu",
            )  # fmt: skip
            t0 = time.time()
            run_distillation(config, run_dir, resume=(run_dir / "job.json").exists())
            (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        row["distilled"] = score(args, run_dir / "student")
        log(f"{name} distilled: {json.dumps(row['distilled'])}")
    return row


def print_table(args, report: dict, rows: list[dict], preset_fraction: float) -> None:
    fid = rows[0]["undistilled"]["fidelity"]
    print(f"\n{args.base}, params budget {report['budget']:.3f} ({args.preset}'s fraction: "
          f"{preset_fraction:.3f}); teacher fidelity {fid:.3f} on "
          f"{rows[0]['undistilled']['samples']} held-out samples; distillation {args.steps} steps\n")  # fmt: skip
    head = "| student | params | deviation | fidelity | PSNR dB | SSIM |"
    if args.steps:
        head += f" fidelity after {args.steps} | PSNR after | SSIM after |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        u = r["undistilled"]
        line = (f"| {r['student']} | {r['params'] / 1e6:.2f}M ({r['fraction']:.3f}) | {r['deviation']:.4f} | "
                f"{u['student_fidelity']:.3f} | {u['psnr']:.2f} | {u['ssim']:.3f} |")  # fmt: skip
        if args.steps:
            d = r["distilled"]
            line += f" {d['student_fidelity']:.3f} | {d['psnr']:.2f} | {d['ssim']:.3f} |"
        print(line)
    for method, s in report["search"].items():
        print(f"\n{method} search: {s['seconds']:.1f} s, {s['evaluations']} measured plans")
    print(f"sensitivity map: {report['map']}")


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out)
    base = resolve_base(args.base)
    catalog = build_catalog(base.unet_config)
    preset = load_preset(args.preset)
    preset_spec = compile_plan(catalog, preset)
    preset_fraction = preset_spec.student_params / preset_spec.teacher_params
    budget = args.budget or preset_fraction
    tag = f"{budget:.3f}"
    report: dict = {
        "base": args.base,
        "preset": args.preset,
        "budget": budget,
        "threads": torch.get_num_threads(),
    }
    found, probe = run_searches(args, base, catalog, budget, tag, report)
    plans = {args.preset: preset, **found}
    teacher = load_unet(args.base)
    rows = [
        score_plan(args, teacher, catalog, probe, name, plan, out / tag / name)
        for name, plan in plans.items()
    ]
    report["rows"] = rows
    (out / tag).mkdir(parents=True, exist_ok=True)
    (out / tag / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(args, report, rows, preset_fraction)


if __name__ == "__main__":
    main()
