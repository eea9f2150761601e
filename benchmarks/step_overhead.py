"""Cost of our distillation step against a bare loop, and of the latent/text cache.

Three ways to take the same optimizer steps on the same student, teacher and data:

- ours: ``run_distillation`` (hooks, feature losses, metrics/status writes every step,
  a checkpoint every --checkpoint-every steps), timed from its metrics rows;
- bare: a plain loop doing the same teacher forward, student forward/backward with task
  + output loss, and AdamW step, on the cached latents/embeddings;
- re-encode: the bare loop, but running the VAE and both text encoders on every batch.

    python benchmarks/step_overhead.py [--base toy] [--steps 40] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
import torch.nn.functional as F

from workbench.data import (
    LatentCache,
    _to_tensor,
    batch_indices,
    encode_examples,
    encode_text,
    step_generator,
    toy_examples,
)
from workbench.distill import DistillConfig, run_distillation
from workbench.models import load_pipeline
from workbench.presets import load_preset
from workbench.runs import read_metrics
from workbench.surgery import build_student


def ours(args, run_dir: Path) -> float:
    config = DistillConfig(
        stages=(load_preset(args.preset).to_dict(),), steps=args.steps, base=args.base,
        toy_samples=args.samples, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
        device="cpu", sample_steps=1,
    )  # fmt: skip
    run_distillation(config, run_dir)
    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    times = [r["time"] for r in rows[args.warmup :]]
    return (times[-1] - times[0]) / (len(times) - 1)


def _batch(cache: LatentCache, scheduler, step: int, args) -> dict:
    idx = batch_indices(len(cache), args.batch_size, step, 0, 1, 0)
    gen = step_generator(0, step, 0, 0)
    latents = cache.latent_mean[idx] + cache.latent_std[idx] * torch.randn(
        cache.latent_mean[idx].shape, generator=gen
    )
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (len(idx),), generator=gen)
    return {
        "inputs": {"sample": scheduler.add_noise(latents, noise, t), "timestep": t,
                   "encoder_hidden_states": cache.prompt_embeds[idx],
                   "added_cond_kwargs": {"text_embeds": cache.pooled[idx], "time_ids": cache.time_ids[idx]}},
        "target": noise,
    }  # fmt: skip


def _reencode(pipe, examples, cache: LatentCache, step: int, args) -> None:
    """Work a cache-less loop does per batch: VAE-encode the images, encode the captions."""
    idx = batch_indices(len(examples), args.batch_size, step, 0, 1, 0).tolist()
    pixels = torch.stack([_to_tensor(examples[i].load(), args.resolution)[0] for i in idx])
    with torch.no_grad():
        pipe.vae.encode(pixels).latent_dist.sample()
    encode_text(pipe, [examples[i].caption for i in idx])


def bare(args, pipe, examples, cache, reencode: bool) -> float:
    from diffusers import DDPMScheduler

    teacher = pipe.unet
    student, _ = build_student(teacher, load_preset(args.preset))
    student.train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    stamps = []
    for step in range(args.steps):
        if reencode:
            _reencode(pipe, examples, cache, step, args)
        b = _batch(cache, scheduler, step, args)
        with torch.no_grad():
            t_pred = teacher(**b["inputs"]).sample
        s_pred = student(**b["inputs"]).sample
        loss = F.mse_loss(s_pred, b["target"]) + 0.5 * F.mse_loss(s_pred, t_pred)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    times = stamps[args.warmup :]
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--preset", default="ssd-1b")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    pipe = load_pipeline(args.base)
    args.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    examples = toy_examples(args.samples, 0)
    cache = encode_examples(pipe, examples, args.resolution)
    results: dict[str, list[float]] = {"ours": [], "bare": [], "re-encode": []}
    for r in range(args.repeats):  # alternate, so drift in machine load hits all three alike
        with tempfile.TemporaryDirectory() as tmp:
            results["ours"].append(ours(args, Path(tmp) / "run"))
        results["bare"].append(bare(args, pipe, examples, cache, reencode=False))
        results["re-encode"].append(bare(args, pipe, examples, cache, reencode=True))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\n{args.steps} steps, batch {args.batch_size}, {args.base}/{args.preset}, checkpoint every {args.checkpoint_every}"
    )
    print("| loop | s/step (median of repeats) | vs bare |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['bare']:.2f}x |")
    print(f"\ncache speedup (re-encode / bare): {med['re-encode'] / med['bare']:.2f}x")


if __name__ == "__main__":
    main()
