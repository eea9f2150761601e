"""Auto-prune on the toy: does a sensitivity-chosen plan beat a hand-made preset?

For one budget (default: the parameter fraction of a preset on this base, so the sizes
match) this script:

1. measures (or reads from cache) the full sensitivity map, with the fidelity drops
   (``--no-map-fidelity``: deviations only; the searches use nothing else);
2. runs both searches, ``static`` and ``rescored``, timing each;
3. scores the undistilled students of the preset and both auto plans: deviation on the
   calibration calls (what the search minimises), and on the same held-out samples (never
   seen by the search) the toy checker's full-prompt accuracy and fidelity and PSNR/SSIM
   against the teacher's images, each a mean with a 95% interval (cluster bootstrap over
   prompts), plus paired differences from the preset's student;
4. distils each student for the same steps with the same settings (layer-level KD) and
   scores them again.

    python benchmarks/autoprune.py [--budget 0.29] [--preset segmind-vega] [--steps 400] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scoring

from workbench import autoprune as ap
from workbench.catalog import build_catalog
from workbench.distill import DistillConfig, run_distillation
from workbench.evaluation import LABELS
from workbench.models import load_unet, resolve_base
from workbench.presets import load_preset
from workbench.sensitivity import Probe, sensitivity
from workbench.surgery import build_student, compile_plan, save_student


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scoring.add_training_options(
        p, steps=400, samples=1024, preset_help="the hand-made plan to compare with",
        steps_help="distillation steps per student (0: skip)",
    )  # fmt: skip
    p.add_argument("--budget", type=float, default=None, help="params fraction (default: the preset's)")
    p.add_argument("--candidates", type=int, default=ap.CANDIDATES)
    p.add_argument("--train-seed", type=int, default=0, help="seed of every distillation run")
    scoring.add_sample_options(p)
    p.add_argument("--refresh-map", action="store_true", help="measure the sensitivity map again")
    p.add_argument("--no-map-fidelity", action="store_true", help="map without the fidelity drops (faster)")
    p.add_argument("--out", default="runs/autoprune")
    return p.parse_args()


def distil(args: argparse.Namespace, plan, run_dir: Path) -> Path:
    if not (run_dir / "student" / "config.json").exists():
        config = DistillConfig(
            stages=(plan.to_dict(),), steps=args.steps, base=args.base, toy_samples=args.samples,
            batch_size=args.batch_size, lr=args.lr, checkpoint_every=max(50, args.steps // 4),
            log_every=10, seed=args.train_seed, device="cpu",
        )  # fmt: skip
        t0 = time.time()
        run_distillation(config, run_dir, resume=(run_dir / "job.json").exists())
        (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    return run_dir / "student"


def run_searches(args, base, catalog, preset, budget: float, tag: str, report: dict) -> tuple[dict, Probe]:
    """The sensitivity map, then both searches at the budget: (plans by name, probe)."""
    started = time.perf_counter()
    smap = sensitivity(base, fidelity=not args.no_map_fidelity, refresh=args.refresh_map,
                       progress=lambda f, m: None)  # fmt: skip
    report["map"] = {"seconds_measured": smap.seconds, "from_cache": smap.from_cache,
                     "seconds_now": time.perf_counter() - started, "units": len(smap.units),
                     "scored": sum(u.scored for u in smap.units.values())}  # fmt: skip
    log(f"sensitivity map: {report['map']}")
    probe = Probe(base)

    plans = {args.preset: preset}
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


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out)
    base = resolve_base(args.base)
    catalog = build_catalog(base.unet_config)
    preset = load_preset(args.preset)
    preset_spec = compile_plan(catalog, preset)
    budget = args.budget or preset_spec.student_params / preset_spec.teacher_params
    tag = f"{budget:.3f}"
    scoring.claim(out, args.base)
    report: dict = {
        "base": args.base,
        "preset": args.preset,
        "budget": budget,
        "threads": torch.get_num_threads(),
    }

    plans, probe = run_searches(args, base, catalog, preset, budget, tag, report)

    e = scoring.evaluator(args.base, args.prompts, args.seeds)
    teacher = load_unet(args.base)
    report["settings"], report["interval"] = e.settings, e.bootstrap.describe()
    report["teacher"] = scoring.ev.as_dicts(e.summary(e.teacher()))
    folders: dict[str, dict[str, Path]] = {}
    for name, plan in plans.items():
        spec = compile_plan(catalog, plan)
        folder = out / tag / name / "undistilled"
        if not (folder / "config.json").exists():
            student, _ = build_student(teacher, plan)
            save_student(student, spec, folder)
        folders[name] = {"undistilled": folder}
        if args.steps:
            folders[name]["distilled"] = distil(
                args, plan, out / tag / name / f"distill-{args.steps}-seed{args.train_seed}"
            )
        report.setdefault("rows", []).append({
            "student": name, "params": spec.student_params,
            "fraction": spec.student_params / spec.teacher_params, "deviation": probe.deviation(plan.removed),
        })  # fmt: skip
    for stage in ("undistilled", "distilled") if args.steps else ("undistilled",):
        scores = {name: scoring.student_scores(e, f[stage]) for name, f in folders.items()}
        for row in report["rows"]:
            row[stage] = scoring.figures(e, scores[row["student"]], scores[args.preset])
            means = ", ".join(f"{k} {v['mean']:.3f}" for k, v in row[stage]["summary"].items())
            log(f"{row['student']} {stage}: {means}")
    (out / tag).mkdir(parents=True, exist_ok=True)
    (out / tag / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(args, e, report, preset_spec)


def print_report(args: argparse.Namespace, e, report: dict, preset_spec) -> None:
    budget, teacher = report["budget"], report["teacher"]
    print(f"\n{args.base}, params budget {budget:.3f} ({args.preset}'s fraction: "
          f"{preset_spec.student_params / preset_spec.teacher_params:.3f}); distillation {args.steps} steps, "
          f"training seed {args.train_seed}\n{scoring.header(e, args.base)}")  # fmt: skip
    print(
        f"teacher: full prompt {scoring.cell(teacher.get('full'))}, fidelity {scoring.cell(teacher.get('fidelity'))}"
    )
    keys = [
        k for k in ("full", "fidelity", "psnr", "ssim") if k in report["rows"][0]["undistilled"]["summary"]
    ]
    for stage in ("undistilled", "distilled") if args.steps else ("undistilled",):
        print(f"\n{stage}{f' ({args.steps} steps of layer-level KD)' if stage == 'distilled' else ''}:\n")
        head = ["student", "params (fraction)", "deviation", *[LABELS[k] for k in keys]]
        rows = [(r["student"], [f"{r['params'] / 1e6:.2f}M ({r['fraction']:.3f})", f"{r['deviation']:.2g}",
                                *[scoring.cell(r[stage]["summary"][k], 2 if k == "psnr" else 3) for k in keys]])
                for r in report["rows"]]  # fmt: skip
        print("\n".join(scoring.table(rows, head)))
        print(f"\n{stage}, paired with the {args.preset} student (bold: the interval excludes 0):\n")
        rows = [(r["student"], [scoring.diff_cell(r[stage]["minus_reference"][k], 2 if k == "psnr" else 3)
                                for k in keys]) for r in report["rows"][1:]]  # fmt: skip
        print("\n".join(scoring.table(rows, ["student", *[f"{LABELS[k]} - {args.preset}" for k in keys]])))
    for method, s in report["search"].items():
        print(f"\n{method} search: {s['seconds']:.1f} s, {s['evaluations']} measured plans")
    print(f"sensitivity map: {report['map']}")


if __name__ == "__main__":
    main()
