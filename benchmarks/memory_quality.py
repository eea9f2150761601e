"""What does each memory-lean option cost in quality? Equal steps on the toy.

Layer-level KD of a preset student (default Segmind-Vega) of the toy teacher, the same seed,
data, steps and learning rate for every variant; only the memory option differs:

- adamw-fp32: full precision, AdamW (the reference);
- bf16: bf16 mixed precision (autocast) for the student;
- checkpointing: gradient checkpointing (recomputes activations; same arithmetic);
- adamw8bit: 8-bit AdamW (bitsandbytes; skipped when it is not installed);
- lora: LoRA-enhanced distillation (adapters of ``--lora-rank`` where a layer's input held);
- precompute: teacher targets precomputed to disk (exact: the same losses as live).

Each student is scored on the same held-out toy samples: fidelity (colour and shape right)
and full-prompt accuracy with 95% intervals (cluster bootstrap over prompts), and the PSNR of
its images against the adamw-fp32 student's images of the same samples (100 dB: identical).
The estimated peak (``python -m workbench memory --target cpu``) of the same run is beside it.

    python benchmarks/memory_quality.py [--preset segmind-vega] [--steps 100] [--prompts 20] [--seeds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scoring

from workbench import evaluation as ev
from workbench import memory
from workbench.distill import DistillConfig
from workbench.presets import load_preset
from workbench.sampling import load_student_unet

VARIANTS = {
    "adamw-fp32": {},
    "bf16": {"mixed_precision": "bf16"},
    "checkpointing": {"gradient_checkpointing": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "lora": {"lora_rank": 16},
    "precompute": {"teacher_targets": "precompute"},
}
REFERENCE = "adamw-fp32"
ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scoring.add_training_options(p, steps=100, samples=512)
    p.add_argument("--lora-rank", type=int, default=16)
    scoring.add_sample_options(p)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/memory_quality")
    args = p.parse_args()
    scoring.variant_names(p, args.variants, VARIANTS)
    return args


def config(args: argparse.Namespace, name: str) -> DistillConfig:
    options = VARIANTS[name] | ({"lora_rank": args.lora_rank} if name == "lora" else {})
    return DistillConfig(
        stages=(load_preset(args.preset).to_dict(),), steps=args.steps, base=args.base, toy_samples=args.samples,
        batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.steps, log_every=10, seed=0, device="cpu",
        w_task=1.0, w_out=0.5, w_feat=0.5, feature_mode="layer", **options,
    )  # fmt: skip


def flags(args: argparse.Namespace, name: str) -> list[str]:
    """The ``python -m workbench distill`` flags of a variant (each its own process: accelerate's
    state, mixed precision included, is fixed once per process)."""
    c = config(args, name)
    out = ["--base", c.base, "--preset", args.preset, "--steps", str(c.steps), "--toy-samples", str(c.toy_samples),
           "--batch-size", str(c.batch_size), "--lr", str(c.lr), "--checkpoint-every", str(c.steps),
           "--log-every", "10", "--sample-steps", "4", "--device", "cpu", "--mixed-precision", c.mixed_precision,
           "--optimizer", c.optimizer, "--lora-rank", str(c.lora_rank), "--teacher-targets", c.teacher_targets]  # fmt: skip
    return out + (["--gradient-checkpointing"] if c.gradient_checkpointing else [])


def train(args: argparse.Namespace, name: str, run_dir: Path) -> float | None:
    """Distil one variant (kept if already done); its wall time in minutes."""
    if not (run_dir / "student" / "config.json").exists():
        started = time.time()
        resume = ["--resume"] if (run_dir / "job.json").exists() else []
        cmd = [sys.executable, "-m", "workbench", "distill", "--run-dir", str(run_dir), *resume]
        subprocess.run(cmd + ([] if resume else flags(args, name)), check=True, cwd=ROOT)
        (run_dir / "wall_s.txt").write_text(f"{time.time() - started:.1f}\n")
    wall = run_dir / "wall_s.txt"
    return float(wall.read_text()) / 60 if wall.exists() else None


def draw(e, run_dir: Path) -> list:
    """The student's images of the evaluation samples, drawn once and kept beside it."""
    from PIL import Image

    s = e.settings
    cache = run_dir / f"eval-{s['prompts']}x{s['seeds']}-{s['steps']}steps-g{s['guidance']:g}.npy"
    if cache.exists():
        return [Image.fromarray(a) for a in np.load(cache)]
    images = e.draw(load_student_unet(run_dir / "student", e.pipe.unet))
    np.save(cache, np.stack([np.asarray(i) for i in images]))
    return images


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    out = (Path(args.out) / f"{args.preset}-{args.steps}").resolve()
    scoring.claim(out, args.base)
    names = [
        n for n in args.variants.split(",") if n != "adamw8bit" or importlib.util.find_spec("bitsandbytes")
    ]
    skipped = sorted(set(args.variants.split(",")) - set(names))
    names = [REFERENCE, *[n for n in names if n != REFERENCE]]
    e = scoring.evaluator(args.base, args.prompts, args.seeds)
    rows, images = {}, {}
    for name in names:
        minutes = train(args, name, out / name)
        images[name] = draw(e, out / name)
        values, _ = ev.judge(images[name], e.samples)
        values |= ev.similarity(images[name], images[REFERENCE])
        estimate = memory.estimate(config(args, name), device="cpu")
        summary = ev.as_dicts(e.summary(ev.Scores(e.samples, values)))
        rows[name] = {"minutes": minutes, "summary": summary, "peak_bytes": estimate.total,
                      "psnr_vs_reference_mean": float(np.mean(values["psnr"]))}  # fmt: skip
        print(f"{name}: done ({minutes or 0:.1f} min)", flush=True)
    report = {"args": vars(args), "skipped": skipped, "settings": e.settings,
              "interval": e.bootstrap.describe(), "variants": rows}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(args, e, report)


def print_report(args: argparse.Namespace, e, report: dict) -> None:
    print(f"\n{args.preset} student of {args.base}, layer-level KD, {args.steps} steps, batch {args.batch_size}, "
          f"lr {args.lr}\n{scoring.header(e, args.base)}\n")  # fmt: skip
    head = [
        "option",
        "train min",
        "est. peak (toy, cpu)",
        "fidelity",
        "full prompt",
        f"PSNR vs {REFERENCE} dB",
    ]
    rows = []
    for name, r in report["variants"].items():
        s = r["summary"]
        rows.append((name, [f"{r['minutes'] or 0:.1f}", memory.gib(r["peak_bytes"]), scoring.cell(s.get("fidelity")),
                            scoring.cell(s.get("full")), scoring.cell(s["psnr"], 2)]))  # fmt: skip
    print("\n".join(scoring.table(rows, head)))
    if report["skipped"]:
        print(f"\nskipped: {', '.join(report['skipped'])} (bitsandbytes is not installed)")


if __name__ == "__main__":
    main()
