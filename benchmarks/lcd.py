"""Few-step students on the toy: a Vega-preset student after block KD, then latent consistency
distillation (LCD) in its forms, against the teacher at 20 guided steps.

One block-KD run (layer-level KD, ``--preset segmind-vega``); then each LCD variant starts from
that run's student (``--objective lcd --init-student``), so they share the same starting point:

- ``lcd``: full weights with LCM's w-embedding (the guidance scale as an input);
- ``lcm-lora``: rank-R adapters on the KD student (no w-embedding, sampled without guidance);
- ``rg-lcd``: ``lcd`` plus the reward term on the one-step prediction through the shipped toy
  latent proxy reward model (``--reward``, ``--reward-weight``).

Every model is scored at 1, 2, 4 and 8 steps on the same held-out samples against the teacher's
20-step guided images (toy checker: fidelity, full prompt; PSNR / SSIM against the teacher's image
of the same sample), each a mean with a 95% interval (cluster bootstrap over prompts), ratios to
the teacher paired. Then the latency of one image, end to end (text encoders, every UNet call,
VAE decode), interleaved on this CPU. Scores of each row are kept in ``OUT/scores/`` so a re-run
draws only what is new.

    OMP_NUM_THREADS=1 python benchmarks/lcd.py [--steps 400] [--lcd-steps 400] [--prompts 81] [--seeds 8]
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

VARIANTS = ("lcd", "lcm-lora", "rg-lcd")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--preset", default="segmind-vega")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of block KD")
    p.add_argument("--lcd-steps", type=int, default=400, help="optimizer steps of each LCD variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"LCD variants ({', '.join(VARIANTS)})")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the LCM-LoRA variant")
    p.add_argument(
        "--reward", default="toy", help="rg-lcd: the reward model (default: the shipped toy proxy)"
    )
    p.add_argument("--reward-weight", type=float, default=0.1, help="rg-lcd: weight of the reward term")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=1024, help="cached toy training images")
    scoring.add_sample_options(p)
    p.add_argument("--step-counts", default="8,4,2,1", help="steps every model is scored at")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--train-only", action="store_true", help="train what is missing, score nothing")
    p.add_argument(
        "--variants-only",
        action="store_true",
        help="score the variants' rows only (not the teacher's or KD's)",
    )
    p.add_argument("--out", default="runs/lcd")
    return p.parse_args()


def variant_fields(args: argparse.Namespace, variant: str) -> dict:
    if variant == "lcd":
        return {}
    if variant == "lcm-lora":
        return {"lcd_lora_rank": args.lora_rank}
    if variant == "rg-lcd":
        return {"lcd_reward": args.reward, "lcd_reward_weight": args.reward_weight}
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def train(args: argparse.Namespace, out: Path, variants: list[str]) -> dict[str, float]:
    """The KD run, then each LCD variant from its student (each resumed if stopped); minutes of each."""
    plan = load_preset(args.preset).to_dict()
    common = dict(stages=(plan,), base=args.base, toy_samples=args.samples, batch_size=args.batch_size,
                  lr=args.lr, log_every=10, device="cpu")  # fmt: skip
    runs = {"kd": DistillConfig(**common, steps=args.steps, checkpoint_every=max(50, args.steps // 4))}
    for v in variants:
        runs[v] = DistillConfig(**common, steps=args.lcd_steps, checkpoint_every=max(50, args.lcd_steps // 4),
                                objectives=("lcd",), init_student=str(out / "kd"), **variant_fields(args, v))  # fmt: skip
    minutes = {}
    for name, config in runs.items():
        run_dir = out / name
        if not (run_dir / "student" / "config.json").exists():
            print(f"training {name}", flush=True)
            run_distillation(config, run_dir, resume=(run_dir / "job.json").exists())
        rows, _ = read_metrics(run_dir / "metrics.jsonl")
        minutes[name] = max(r["time"] for r in rows) / 60  # the run's own clock (resumes add up)
    return minutes


def score(e: ev.Evaluator, out: Path, name: str, unet, sampler: ev.Sampler) -> ev.Scores:
    """A row's per-sample scores, from ``OUT/scores`` or drawn now."""
    s = e.settings
    slug = name.replace(" ", "_").replace(",", "")
    cache = out / "scores" / f"{slug}-{s['prompts']}x{s['seeds']}.json"
    if cache.exists():
        return ev.Scores.from_rows(json.loads(cache.read_text()), e.samples)
    started = time.perf_counter()
    scores = e.student(unet, sampler)  # with unet None: the teacher, drawn the sampler's way
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(scores.rows()) + "\n")
    print(f"scored {name} ({time.perf_counter() - started:.0f} s)", flush=True)
    return scores


def load_teacher_images(e: ev.Evaluator, out: Path) -> Path:
    """The teacher's reference images from ``OUT`` if an earlier run drew them (else drawn later
    and saved there): one draw of the 20-step teacher serves every run on this folder."""
    import numpy as np
    from PIL import Image

    s = e.settings
    path = out / f"teacher-images-{s['prompts']}x{s['seeds']}-{s['steps']}steps-g{s['guidance']:g}.npz"
    if path.exists():
        e._teacher_images = [Image.fromarray(a) for a in np.load(path)["images"]]
    return path


def save_teacher_images(e: ev.Evaluator, path: Path) -> None:
    import numpy as np

    if not path.exists():
        np.savez_compressed(path, images=np.stack([np.asarray(i) for i in e.teacher_images()]))


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
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    out = Path(args.out) / f"{args.preset}-{args.steps}-{args.lcd_steps}"
    scoring.claim(out, args.base)
    minutes = train(args, out, variants)
    if args.train_only:
        return
    e = scoring.evaluator(args.base, args.prompts, args.seeds)  # the teacher: 20 Euler steps, guidance 2
    g = e.guidance
    counts = [int(n) for n in args.step_counts.split(",")]
    kd = load_student_unet(RunDir(out / "kd").student, e.pipe.unet)
    rows = [] if args.variants_only else [("block-KD student, 20 Euler steps", kd, ev.Sampler(20, g))]
    for n in [] if args.variants_only else counts:
        rows += [(f"teacher, {n} Euler steps", None, ev.Sampler(n, g)),
                 (f"block-KD student, {n} Euler steps", kd, ev.Sampler(n, g))]  # fmt: skip
    students = {v: load_student_unet(RunDir(out / v).student, e.pipe.unet) for v in variants}
    for v, unet in students.items():  # LCM-LoRA has no w-embedding: one unguided call per step
        rows += [(f"{v} student, {n} LCM steps", unet, ev.Sampler(n, 1.0 if v == "lcm-lora" else g, "lcm"))
                 for n in counts]  # fmt: skip
    images = load_teacher_images(e, out)
    teacher = e.teacher()
    save_teacher_images(e, images)
    report = {"args": vars(args), "settings": e.settings, "interval": e.bootstrap.describe(), "minutes": minutes,
              "teacher": ev.as_dicts(e.summary(teacher)), "models": {}}  # fmt: skip
    for name, unet, sampler in rows:
        report["models"][name] = {
            "sampler": sampler.to_dict(),
            **scoring.figures(e, score(e, out, name, unet, sampler)),
        }
    if "rg-lcd" in students and "lcd" in students:  # paired: what the reward term changes
        for n in counts:
            a, b = (score(e, out, f"{v} student, {n} LCM steps", None, None) for v in ("rg-lcd", "lcd"))
            report["models"][f"rg-lcd student, {n} LCM steps"]["minus_lcd"] = ev.as_dicts(e.difference(a, b))
    timed = [("teacher, 20 steps, guided", None, ev.Sampler(20, g))]
    timed += [
        (f"{v} student, {n} LCM steps", students[v], ev.Sampler(n, 1.0 if v == "lcm-lora" else g, "lcm"))
        for v in ("lcd", "lcm-lora")
        if v in students
        for n in (4, 2)
    ]  # fmt: skip (rg-lcd: lcd's shape)
    report["latency_s"] = latency(e.pipe, timed, args.latency_repeats)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(args, e, report)


def print_report(args: argparse.Namespace, e, report: dict) -> None:
    m, teacher = report["minutes"], report["teacher"]
    trained = ", ".join(f"{k} {v:.1f} min" for k, v in m.items())
    print(f"\n{args.preset} student of {args.base}: {args.steps} steps block KD, then {args.lcd_steps} steps of "
          f"each LCD variant from its student ({trained}), batch {args.batch_size}, lr {args.lr}\n"
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
    paired = [(n, f["minus_lcd"]) for n, f in report["models"].items() if "minus_lcd" in f]
    if paired:
        print("\nrg-lcd minus lcd, paired on the same samples:\n")
        keys = ["fidelity", "full", "psnr", "ssim"]
        table = [(n, [scoring.cell(d.get(k), 3) for k in keys]) for n, d in paired]
        print("\n".join(scoring.table(table, ["model", *keys])))
    lat = report["latency_s"]
    teacher_s = lat["teacher, 20 steps, guided"]
    print("\nimage latency (CPU, batch 1, end to end, median of interleaved repeats):\n")
    rows = [(name, [f"{s * 1000:.0f} ms", f"{teacher_s / s:.1f}x"]) for name, s in lat.items()]
    print("\n".join(scoring.table(rows, ["model", "per image", "faster than the teacher"])))


if __name__ == "__main__":
    main()
