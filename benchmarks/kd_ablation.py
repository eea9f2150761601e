"""Which distillation loss recovers a pruned toy student best, at equal steps and seed?

Variants (weights task / output / feature):
- undistilled: the student as built from the teacher's weights, no training;
- task-only (1 / 0 / 0), output-only (0 / 1 / 0),
- block-level (1 / 0.5 / 0.5, stage outputs as BK-SDM),
- layer-level (1 / 0.5 / 0.5, every kept ResNet and attention output as SSD-1B; our default);
- layer-sensitivity / layer-freeze2: layer-level, guided by the sensitivity map (feature
  terms weighted by sensitivity; the 2 most sensitive kept layers frozen).

Each student is scored on the toy's held-out prompts (fidelity: colour and shape judged
right) and against the teacher's images on the same seeds (PSNR, SSIM).

    python benchmarks/kd_ablation.py [--steps 400] [--variants task,output,block,layer]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from workbench.commands.evaluate import evaluate
from workbench.distill import DistillConfig, run_distillation
from workbench.models import load_unet
from workbench.presets import load_preset
from workbench.surgery import build_student, save_student

VARIANTS = {
    "task": {"w_task": 1.0, "w_out": 0.0, "w_feat": 0.0, "feature_mode": "none"},
    "output": {"w_task": 0.0, "w_out": 1.0, "w_feat": 0.0, "feature_mode": "none"},
    "block": {"w_task": 1.0, "w_out": 0.5, "w_feat": 0.5, "feature_mode": "block"},
    "layer": {"w_task": 1.0, "w_out": 0.5, "w_feat": 0.5, "feature_mode": "layer"},
    # sensitivity-guided (HierarchicalPrune): feature terms weighted by the sensitivity map,
    # or the 2 most sensitive kept layers frozen at the teacher's weights
    "layer-sensitivity": {"w_task": 1.0, "w_out": 0.5, "w_feat": 0.5, "feature_mode": "layer",
                          "feature_weights": "sensitivity"},
    "layer-freeze2": {"w_task": 1.0, "w_out": 0.5, "w_feat": 0.5, "feature_mode": "layer",
                      "freeze_sensitive": 2},
}  # fmt: skip


def score(args, unet_dir: Path | None) -> dict:
    ns = argparse.Namespace(base=args.base, unet=str(unet_dir) if unet_dir else None,
                            prompts=args.prompts, seeds=args.seeds, steps=20, guidance=5.0)  # fmt: skip
    return evaluate(ns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--preset", default="ssd-1b")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=2048, help="cached toy training images")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="layer,task,output,block")
    p.add_argument("--out", default="runs/kd_ablation")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out)
    plan = load_preset(args.preset)
    table = []
    undistilled = out / "undistilled"
    if not (undistilled / "config.json").exists():
        student, spec = build_student(load_unet(args.base), plan)
        save_student(student, spec, undistilled)
    table.append({"variant": "undistilled", "minutes": 0.0, **score(args, undistilled)})
    print(json.dumps(table[-1]), flush=True)
    for name in args.variants.split(","):
        run_dir = out / name
        if not (run_dir / "student" / "config.json").exists():
            config = DistillConfig(
                stages=(plan.to_dict(),), steps=args.steps, base=args.base, toy_samples=args.samples,
                batch_size=args.batch_size, lr=args.lr, checkpoint_every=max(50, args.steps // 4),
                log_every=10, seed=0, device="cpu", **VARIANTS[name],
            )  # fmt: skip
            started = time.time()
            run_distillation(config, run_dir, resume=(run_dir / "job.json").exists())
            (run_dir / "wall_s.txt").write_text(f"{time.time() - started:.1f}\n")
        minutes = (
            float((run_dir / "wall_s.txt").read_text()) / 60
            if (run_dir / "wall_s.txt").exists()
            else float("nan")
        )
        table.append({"variant": name, "minutes": minutes, **score(args, run_dir / "student")})
        print(json.dumps(table[-1]), flush=True)
    teacher = table[0]["fidelity"]
    print(f"\n{args.preset} student of {args.base}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed 0; "
          f"{table[0]['samples']} held-out samples; teacher fidelity {teacher:.3f}\n")  # fmt: skip
    print(
        "| variant | train min | student fidelity | vs teacher | PSNR dB | SSIM |\n|---|---|---|---|---|---|"
    )
    for row in table:
        print(f"| {row['variant']} | {row['minutes']:.1f} | {row['student_fidelity']:.3f} | "
              f"{row['student_fidelity'] / teacher:.0%} | {row['psnr']:.2f} | {row['ssim']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
