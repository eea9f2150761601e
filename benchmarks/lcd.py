"""Few-step students on the toy: a Vega-preset student after block KD, then latent consistency
distillation (LCD), against the teacher at 20 guided steps.

One run, two stages (``--stages segmind-vega,lcd``): layer-level block KD, then LCD from the
original teacher (guided, scale drawn from the default range, DDIM solver over the 50-step grid,
EMA target, pseudo-Huber loss). Every model is scored on the same held-out samples against the
teacher's 20-step guided images (toy checker: fidelity, full prompt; PSNR / SSIM against the
teacher's image of the same sample), each a mean with a 95% interval (cluster bootstrap over
prompts), ratios to the teacher paired. Then the latency of one image, end to end (text
encoders, every UNet call, VAE decode), interleaved teacher / student on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/lcd.py [--steps 400] [--prompts 81] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scoring

from workbench import evaluation as ev
from workbench.distill import DistillConfig, run_distillation
from workbench.presets import load_preset
from workbench.runs import RunDir, read_metrics
from workbench.sampling import generate, load_student_unet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--preset", default="segmind-vega")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per stage (KD, then LCD)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=1024, help="cached toy training images")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: all 81)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default 3)")
    p.add_argument("--lcm-steps", default="8,4,2,1", help="LCM steps the LCD student is scored at")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--out", default="runs/lcd")
    return p.parse_args()


def train(args: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    """Block KD then LCD in one run (resumed if it was stopped); minutes of each stage."""
    if not (run_dir / "student" / "config.json").exists():
        plan = load_preset(args.preset).to_dict()
        config = DistillConfig(
            stages=(plan, plan), objectives=("kd", "lcd"), steps=args.steps, base=args.base,
            toy_samples=args.samples, batch_size=args.batch_size, lr=args.lr, log_every=10,
            checkpoint_every=max(50, args.steps // 4), device="cpu",
        )  # fmt: skip
        run_distillation(config, run_dir, resume=(run_dir / "job.json").exists())
    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    end = {stage: max(r["time"] for r in rows if r["stage"] == stage) for stage in (1, 2)}
    return {"kd": end[1] / 60, "lcd": (end[2] - end[1]) / 60}  # from the run's own clock (resumes add up)


def latency(pipe, models: list[tuple[str, object, ev.Sampler]], repeats: int) -> dict[str, float]:
    """Median seconds per image (batch 1, end to end), the models interleaved per repeat."""
    times: dict[str, list[float]] = {name: [] for name, *_ in models}
    for r in range(repeats + 1):  # the first round warms up
        for name, unet, s in models:
            started = time.perf_counter()
            generate(pipe, ["a large red circle on a white background, center"], [r], unet=unet,
                     steps=s.steps, guidance=s.guidance, scheduler=s.scheduler)  # fmt: skip
            if r:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out) / f"{args.preset}-{args.steps}"
    scoring.claim(out, args.base)
    minutes = train(args, out / "run")
    e = scoring.evaluator(args.base, args.prompts, args.seeds)  # the teacher: 20 Euler steps, guidance 2
    g = e.guidance
    run = RunDir(out / "run")
    kd = load_student_unet(run.stage_dir(0), e.pipe.unet)
    lcd = load_student_unet(run.student, e.pipe.unet)
    rows = [("teacher, 4 Euler steps", None, ev.Sampler(4, g)), ("teacher, 2 Euler steps", None, ev.Sampler(2, g)),
            ("block-KD student, 20 Euler steps", kd, ev.Sampler(20, g)),
            ("block-KD student, 4 Euler steps", kd, ev.Sampler(4, g))]  # fmt: skip
    rows += [
        (f"LCD student, {n} LCM steps", lcd, ev.Sampler(int(n), g, "lcm")) for n in args.lcm_steps.split(",")
    ]
    teacher = e.teacher()
    report = {"args": vars(args), "settings": e.settings, "interval": e.bootstrap.describe(), "minutes": minutes,
              "teacher": ev.as_dicts(e.summary(teacher)), "models": {}}  # fmt: skip
    for name, unet, sampler in rows:
        scores = e.student(unet, sampler)  # with unet None: the teacher, drawn the sampler's way
        report["models"][name] = {"sampler": sampler.to_dict(), **scoring.figures(e, scores)}
        print(f"scored {name}", flush=True)
    report["latency_s"] = latency(e.pipe, [("teacher, 20 steps, guided", None, ev.Sampler(20, g)),
                                           ("LCD student, 4 LCM steps", lcd, ev.Sampler(4, g, "lcm")),
                                           ("LCD student, 2 LCM steps", lcd, ev.Sampler(2, g, "lcm"))],
                                  args.latency_repeats)  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(args, e, report)


def print_report(args: argparse.Namespace, e, report: dict) -> None:
    m, teacher = report["minutes"], report["teacher"]
    print(f"\n{args.preset} student of {args.base}: {args.steps} steps block KD ({m['kd']:.1f} min) then "
          f"{args.steps} steps LCD ({m['lcd']:.1f} min), batch {args.batch_size}, lr {args.lr}\n"
          f"{scoring.header(e, args.base)}\n")  # fmt: skip
    print(f"teacher (20 Euler steps, guided): full prompt {scoring.cell(teacher.get('full'))}, "
          f"fidelity {scoring.cell(teacher.get('fidelity'))}\n")  # fmt: skip
    head = ["model", "fidelity", "vs teacher", "full prompt", "vs teacher", "PSNR dB", "SSIM"]
    rows = []
    for name, f in report["models"].items():
        s, vs = f["summary"], f["vs_teacher"]
        rows.append((name, [scoring.cell(s.get("fidelity")), scoring.cell(vs.get("fidelity"), 2),
                            scoring.cell(s.get("full")), scoring.cell(vs.get("full"), 2),
                            scoring.cell(s["psnr"], 2), scoring.cell(s["ssim"])]))  # fmt: skip
    print("\n".join(scoring.table(rows, head)))
    lat = report["latency_s"]
    teacher_s = lat["teacher, 20 steps, guided"]
    print("\nimage latency (CPU, batch 1, end to end, median of interleaved repeats):\n")
    rows = [(name, [f"{s * 1000:.0f} ms", f"{teacher_s / s:.1f}x"]) for name, s in lat.items()]
    print("\n".join(scoring.table(rows, ["model", "per image", "faster than the teacher"])))


if __name__ == "__main__":
    main()
