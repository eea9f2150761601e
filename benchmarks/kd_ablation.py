"""Which distillation loss recovers a pruned toy student best, at equal steps and seed?

Variants (weights task / output / feature):
- undistilled: the student as built from the teacher's weights, no training;
- task-only (1 / 0 / 0), output-only (0 / 1 / 0),
- block-level (1 / 0.5 / 0.5, stage outputs as BK-SDM),
- layer-level (1 / 0.5 / 0.5, every kept ResNet and attention output as SSD-1B; our default);
- layer-normalized: layer-level with each feature term divided by the teacher feature's
  mean square (LAPTOP-Diff, arXiv 2404.11098: unnormalised, a few numerically large
  feature terms dominate the loss);
- layer-sensitivity / layer-freeze2: layer-level, guided by the sensitivity map (feature
  terms weighted by sensitivity; the 2 most sensitive kept layers frozen).

Every student is scored on the same held-out samples (toy checker: each attribute,
full prompt, fidelity; PSNR / SSIM against the teacher's image of the same sample), each
figure a mean with a 95% interval (cluster bootstrap over prompts), and compared *paired*
with the reference variant (default ``layer``): differences whose interval excludes 0 are
in bold. Intervals cover the evaluation samples, not training: each variant trains once.
Every student also gets FID and KID to the teacher's images of the same samples (torchmetrics,
on the toy's offline ``pixels`` features), and the report gives Spearman's rank correlation
across the students (undistilled included) of FID, KID and PSNR with full-prompt accuracy:
do the field's metrics order the students as the checker does?

    python benchmarks/kd_ablation.py [--preset segmind-vega] [--steps 400] [--seeds 8]
        [--variants layer,layer-normalized,task,output,block]
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

from workbench.distill import DistillConfig, run_distillation
from workbench.evaluation import ACCURACIES, LABELS, Metrics
from workbench.models import load_unet
from workbench.presets import load_preset
from workbench.surgery import build_student, save_student

LAYER = {"w_task": 1.0, "w_out": 0.5, "w_feat": 0.5, "feature_mode": "layer"}
VARIANTS = {
    "task": {"w_task": 1.0, "w_out": 0.0, "w_feat": 0.0, "feature_mode": "none"},
    "output": {"w_task": 0.0, "w_out": 1.0, "w_feat": 0.0, "feature_mode": "none"},
    "block": {"w_task": 1.0, "w_out": 0.5, "w_feat": 0.5, "feature_mode": "block"},
    "layer": LAYER,
    "layer-normalized": LAYER | {"normalize_features": True},
    # sensitivity-guided (HierarchicalPrune): feature terms weighted by the sensitivity map,
    # or the 2 most sensitive kept layers frozen at the teacher's weights
    "layer-sensitivity": LAYER | {"feature_weights": "sensitivity"},
    "layer-freeze2": LAYER | {"freeze_sensitive": 2},
}
# FID/KID to the teacher's images on raw-pixel features: the toy's offline extractor
METRICS = Metrics(("psnr", "ssim", "fid", "kid"), fid_features="pixels")
AGAINST_ACCURACY = ("fid", "kid", "psnr")  # ranked against full-prompt accuracy across the students


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scoring.add_training_options(p, steps=400, samples=1024)
    p.add_argument("--train-seed", type=int, default=0, help="seed of every distillation run")
    scoring.add_sample_options(p)
    p.add_argument("--variants", default="layer,layer-normalized,task,output,block")
    p.add_argument("--reference", default="layer", help="the variant the others are compared with")
    p.add_argument("--out", default="runs/kd_ablation")
    args = p.parse_args()
    names = scoring.variant_names(p, args.variants, VARIANTS)
    if args.reference not in ("undistilled", *names):
        p.error(f"--reference {args.reference!r} is not among the variants run")
    return args


def train(args: argparse.Namespace, plan, name: str, run_dir: Path) -> float:
    """Distil one variant (or resume it); its wall time in minutes."""
    if not (run_dir / "student" / "config.json").exists():
        config = DistillConfig(
            stages=(plan.to_dict(),), steps=args.steps, base=args.base, toy_samples=args.samples,
            batch_size=args.batch_size, lr=args.lr, checkpoint_every=max(50, args.steps // 4),
            log_every=10, seed=args.train_seed, device="cpu", **VARIANTS[name],
        )  # fmt: skip
        started = time.time()
        run_distillation(config, run_dir, resume=(run_dir / "job.json").exists())
        (run_dir / "wall_s.txt").write_text(f"{time.time() - started:.1f}\n")
    wall = run_dir / "wall_s.txt"
    return float(wall.read_text()) / 60 if wall.exists() else float("nan")


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out) / f"{args.preset}-{args.steps}-seed{args.train_seed}"
    scoring.claim(out, args.base)
    plan = load_preset(args.preset)
    e = scoring.evaluator(args.base, args.prompts, args.seeds, METRICS)
    students: dict[str, Path] = {"undistilled": out / "undistilled"}
    minutes = {"undistilled": 0.0}
    if not (students["undistilled"] / "config.json").exists():
        student, spec = build_student(load_unet(args.base), plan)
        save_student(student, spec, students["undistilled"])
    for name in args.variants.split(","):
        minutes[name] = train(args, plan, name, out / name)
        students[name] = out / name / "student"
    scores = {name: scoring.student_scores(e, folder) for name, folder in students.items()}
    reference = scores[args.reference]
    students_ = {n: scoring.figures(e, s, reference) for n, s in scores.items()}
    report = {"args": vars(args), "settings": e.settings, "interval": e.bootstrap.describe(),
              "teacher": scoring.ev.as_dicts(e.summary(e.teacher())), "minutes": minutes,
              "students": students_, "protocol": METRICS.protocol(),
              "rank_correlation": correlations(students_)}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(args, e, report)


def correlations(students: dict[str, dict]) -> dict[str, dict]:
    """Spearman's rho across the students of FID, KID and PSNR with full-prompt accuracy."""
    means = {k: {n: f["summary"][k]["mean"] for n, f in students.items() if k in f["summary"]}
             for k in ("full", *AGAINST_ACCURACY)}  # fmt: skip
    return {k: scoring.rank_correlation(means[k], means["full"]) for k in AGAINST_ACCURACY}


def print_report(args: argparse.Namespace, e, report: dict) -> None:
    teacher, students = report["teacher"], report["students"]
    print(f"\n{args.preset} student of {args.base}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}, "
          f"training seed {args.train_seed}\n{scoring.header(e, args.base)}\n")  # fmt: skip
    print(
        f"teacher: full prompt {scoring.cell(teacher.get('full'))}, fidelity {scoring.cell(teacher.get('fidelity'))}\n"
    )
    head = ["variant", "train min", "full prompt", "vs teacher", "fidelity", "PSNR dB", "SSIM"]
    rows = []
    for name, f in students.items():
        s, vs = f["summary"], f["vs_teacher"]
        rows.append((name, [f"{report['minutes'][name]:.1f}", scoring.cell(s.get("full")),
                            scoring.cell(vs.get("full"), 2), scoring.cell(s.get("fidelity")),
                            scoring.cell(s["psnr"], 2), scoring.cell(s["ssim"])]))  # fmt: skip
    print("\n".join(scoring.table(rows, head)))
    attributes = [a for a in ACCURACIES[:5] if a in teacher]
    if attributes:
        print("\nper attribute:\n")
        rows = [("teacher", [scoring.cell(teacher[a]) for a in attributes])]
        rows += [(n, [scoring.cell(f["summary"][a]) for a in attributes]) for n, f in students.items()]
        print("\n".join(scoring.table(rows, ["variant", *[LABELS[a] for a in attributes]])))
    print(f"\npaired with {args.reference} on the same samples (bold: the interval excludes 0):\n")
    keys = [k for k in ("full", "fidelity", "psnr", "ssim") if k in students[args.reference]["summary"]]
    rows = [(n, [scoring.diff_cell(f["minus_reference"].get(k), 2 if k == "psnr" else 3) for k in keys])
            for n, f in students.items() if n != args.reference]  # fmt: skip
    print("\n".join(scoring.table(rows, ["variant", *[f"{LABELS[k]} - {args.reference}" for k in keys]])))
    print("\nagainst the teacher's images of the same samples:\n")
    rows = [(n, [scoring.cell(f["summary"].get("full")), scoring.cell(f["summary"].get("fid"), 3),
                 scoring.cell(f["summary"].get("kid"), 4), scoring.cell(f["summary"]["psnr"], 2)])
            for n, f in students.items()]  # fmt: skip
    print("\n".join(scoring.table(rows, ["variant", "full prompt", "FID", "KID (mean +- std)", "PSNR dB"])))
    print("".join(f"\n  {LABELS[k]}: {text}" for k, text in report["protocol"].items()))
    print("\nSpearman rank correlation with full-prompt accuracy across the students:\n")
    for k, r in report["rank_correlation"].items():
        rho = "-" if r["rho"] is None else f"{r['rho']:+.3f}"
        print(f"  {LABELS[k]}: rho {rho} (n = {r['n']}: {', '.join(r['names'])})")


if __name__ == "__main__":
    main()
