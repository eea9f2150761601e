"""Train the toy SDXL pipeline from scratch: ``python -m workbench.toy.train``.

Three stages, each resumable from ``--work-dir``:

1. the VAE, on rendered images (reconstruction + a whisper of KL);
2. a cache of latents for a fixed, seeded set of training images;
3. the UNet and both text encoders together, v-prediction on a zero-terminal-SNR
   schedule (see ``build.scheduler``), with 10 % of
   prompts dropped to zeros (what the pipeline feeds for classifier-free guidance),
   min-SNR-style loss weighting and an EMA of the weights, which is what gets saved.

Everything is seeded; the same command on the same torch version gives the same
pipeline (resuming a run also restores the random states).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from workbench.toy import build, world
from workbench.toy import tokenizer as toy_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "toy-sdxl"
PROMPT_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.998


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _progress(stage: str, step: int, total: int, loss: float, started: float, first: int) -> None:
    done = step - first
    rate = done / max(time.time() - started, 1e-9)
    eta = (total - step) / rate if rate else float("inf")
    _log(f"{stage} step {step}/{total} loss {loss:.4f} {rate:.2f} it/s ETA {eta / 60:.1f} min")


# ---------------------------------------------------------------- stage 1: VAE


def train_vae(args: argparse.Namespace) -> AutoencoderKL:
    path = args.work_dir / "vae"
    if (path / "config.json").exists():
        _log(f"VAE: reusing {path}")
        return AutoencoderKL.from_pretrained(path)
    torch.manual_seed(args.seed)
    vae = build.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    rng = random.Random(args.seed)
    scenes = world.all_scenes()  # the VAE never sees captions, so all images are fair
    started = time.time()
    for step in range(1, args.vae_steps + 1):
        images, _ = world.render_batch(rng, scenes, args.vae_batch)
        x = torch.from_numpy(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Tiny KL weight: we want a sharp, almost deterministic autoencoder whose
        # latents stay bounded; the scaling factor fixes their variance later.
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * _cosine(step, args.vae_steps, warmup=50)
        if step % 50 == 0 or step == args.vae_steps:
            _progress("vae", step, args.vae_steps, loss.item(), started, 0)
    vae.save_pretrained(path)
    return vae


# ---------------------------------------------------- stage 2: cached latents


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, C, h, w), unscaled
    std: torch.Tensor
    captions: list[str]


@torch.no_grad()
def cache_latents(args: argparse.Namespace, vae: AutoencoderKL) -> LatentCache:
    path = args.work_dir / "latents.pt"
    if path.exists():
        _log(f"latents: reusing {path}")
        data = torch.load(path, weights_only=True)
        return LatentCache(data["mean"], data["std"], data["captions"])
    rng = random.Random(args.seed + 1)
    scenes = world.train_scenes()  # held-out captions never enter the UNet's data
    means, stds, captions = [], [], []
    for start in range(0, args.cache_images, 256):
        images, caps = world.render_batch(rng, scenes, min(256, args.cache_images - start))
        dist = vae.encode(torch.from_numpy(images)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions += caps
        _log(f"latents {start + len(caps)}/{args.cache_images}")
    cache = LatentCache(torch.cat(means), torch.cat(stds), captions)
    torch.save({"mean": cache.mean, "std": cache.std, "captions": cache.captions}, path)
    return cache


# ------------------------------------------------- stage 3: UNet + text encoders


def encode_prompts(
    tokenizer: CLIPTokenizer,
    encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
    prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly what StableDiffusionXLPipeline.encode_prompt computes: penultimate
    hidden states of both encoders side by side, and encoder 2's projection."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    ids = torch.tensor(ids)
    out1 = encoders[0](ids, output_hidden_states=True)
    out2 = encoders[1](ids, output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return hidden, out2.text_embeds


def _cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine down to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Ema:
    """Exponential moving average of parameters; samples from EMA weights are
    markedly cleaner than from the raw weights of a short diffusion run."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p, 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


@dataclass
class Models:
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection]

    def trainable(self) -> list[torch.nn.Module]:
        return [self.unet, *self.encoders]


def _time_ids(batch: int) -> torch.Tensor:
    size = float(world.RESOLUTION)
    return torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1)


def _diffusion_loss(
    models: Models,
    noise_sched: DDPMScheduler,
    latents: torch.Tensor,
    captions: list[str],
    gen: torch.Generator,
) -> torch.Tensor:
    batch = latents.shape[0]
    hidden, pooled = encode_prompts(models.tokenizer, models.encoders, captions)
    keep = (torch.rand(batch, generator=gen) >= PROMPT_DROPOUT).float()
    hidden = hidden * keep[:, None, None]
    pooled = pooled * keep[:, None]
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
    noisy = noise_sched.add_noise(latents, noise, t)
    cond = {"text_embeds": pooled, "time_ids": _time_ids(batch)}
    pred = models.unet(noisy, t, hidden, added_cond_kwargs=cond).sample
    target = noise_sched.get_velocity(latents, noise, t)  # v = alpha * eps - sigma * x0
    # Min-SNR-style weighting of the v loss: the nearly clean, easy steps (SNR + 1 above
    # gamma) count less; every noisier step counts fully, the pure-noise one included
    # (the v form of min-SNR, min(SNR, gamma) / (SNR + 1), would give it weight 0).
    alphas = noise_sched.alphas_cumprod[t]
    snr_plus_one = 1 / (1 - alphas).clamp_min(1e-8)
    weight = torch.clamp(snr_plus_one, max=MIN_SNR_GAMMA) / snr_plus_one
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def _checkpoint(path: Path, models: Models, ema: Ema, opt, step: int, gen, rng, seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            "seconds": seconds,  # UNet training time so far, over every resumed session
            "unet": models.unet.state_dict(),
            "enc1": models.encoders[0].state_dict(),
            "enc2": models.encoders[1].state_dict(),
            "ema": ema.shadow,
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "rng": rng.getstate(),
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a crash mid-save never corrupts the last checkpoint


def new_models(args: argparse.Namespace) -> Models:
    tokenizer = toy_tokenizer.save(args.work_dir / "tokenizer")
    torch.manual_seed(args.seed)
    return Models(tokenizer, build.unet(), build.text_encoders(tokenizer))


def train_unet(args: argparse.Namespace, cache: LatentCache, scale: float) -> tuple[Models, Ema]:
    models = new_models(args)
    params = [p for m in models.trainable() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = Ema(models.trainable())
    noise_sched = DDPMScheduler.from_config(build.scheduler().config)
    gen = torch.Generator().manual_seed(args.seed + 2)
    rng = random.Random(args.seed + 3)
    ckpt = args.work_dir / "checkpoint.pt"
    first, before = 0, 0.0
    if ckpt.exists():
        first, before = _resume(ckpt, models, ema, opt, gen, rng)
        _log(f"unet: resumed at step {first} ({before / 60:.1f} min of training so far)")
    args.unet_step, args.unet_minutes = first, before / 60
    if args.export_only:
        return models, ema
    started = time.time()
    for step in range(first + 1, args.steps + 1):
        idx = [rng.randrange(len(cache.captions)) for _ in range(args.batch)]
        eps = torch.randn(cache.mean[idx].shape, generator=gen)
        latents = (cache.mean[idx] + cache.std[idx] * eps) * scale
        loss = _diffusion_loss(models, noise_sched, latents, [cache.captions[i] for i in idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * _cosine(step, args.steps, warmup=200)
        opt.step()
        ema.update(step)
        if step % 25 == 0 or step == args.steps:
            _progress("unet", step, args.steps, loss.item(), started, first)
        out_of_time = args.max_minutes and time.time() - started > args.max_minutes * 60
        if step == args.stop_at:
            _log(f"unet: --stop-at reached, stopping at step {step}/{args.steps}")
            _checkpoint(ckpt, models, ema, opt, step, gen, rng, before + time.time() - started)
            break
        if step % args.checkpoint_every == 0 or step == args.steps or out_of_time:
            _checkpoint(ckpt, models, ema, opt, step, gen, rng, before + time.time() - started)
        if out_of_time:
            # A safety net for shared machines; the run is then not the seeded default.
            _log(f"unet: --max-minutes reached, stopping at step {step}/{args.steps}")
            break
        args.unet_step, args.unet_minutes = step, (before + time.time() - started) / 60
    return models, ema


def _resume(path: Path, models: Models, ema: Ema, opt, gen, rng) -> tuple[int, float]:
    state = torch.load(path, weights_only=True)  # tensors, ints, tuples: no code runs
    models.unet.load_state_dict(state["unet"])
    models.encoders[0].load_state_dict(state["enc1"])
    models.encoders[1].load_state_dict(state["enc2"])
    for s, saved in zip(ema.shadow, state["ema"], strict=True):
        s.copy_(saved)
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    rng.setstate(state["rng"])
    return int(state["step"]), float(state.get("seconds", 0.0))


# ------------------------------------------------------------------- main


def latent_scale(cache: LatentCache) -> float:
    """SDXL-style scaling factor: makes the training latents unit variance."""
    return float(1.0 / cache.mean.std())


def export(args: argparse.Namespace, vae: AutoencoderKL, models: Models, ema: Ema, scale: float) -> None:
    ema.copy_to_model()
    vae.register_to_config(scaling_factor=scale)
    pipe = build.assemble(vae, models.encoders, models.tokenizer, models.unet)
    pipe.save_pretrained(args.out)
    # transformers 5 saves only tokenizer.json; keep the plain BPE files beside it so
    # the tokenizer stays readable and loadable by older tooling too.
    for folder in ("tokenizer", "tokenizer_2"):
        toy_tokenizer.save(args.out / folder)
    _scrub_local_paths(args.out)
    record = {  # the flags that decide the weights; no local paths
        "command": reproduce_command(args),
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps_scheduled": args.steps,
        "unet_steps_done": args.unet_step,
        "unet_training_minutes": round(args.unet_minutes, 1),
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _log(f"saved pipeline to {args.out}")


def reproduce_command(args: argparse.Namespace) -> str:
    """The command that rebuilds these weights exactly (paths left at their defaults)."""
    flags = ["--seed", args.seed, "--vae-steps", args.vae_steps, "--steps", args.steps, "--batch", args.batch,
             "--lr", args.lr, "--cache-images", args.cache_images, "--threads", args.threads]  # fmt: skip
    if args.unet_step < args.steps:
        flags += ["--stop-at", args.unet_step]
    return "python -m workbench.toy.train " + " ".join(str(f) for f in flags)


def _scrub_local_paths(out: Path) -> None:
    """Saved configs remember where their model was loaded from (``_name_or_path``, the
    tokenizer's ``local_files_only``); a shipped asset must not carry this machine's paths."""
    for path in out.glob("*/*config.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("_name_or_path", None)
        if "local_files_only" in data:
            data["local_files_only"] = False
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workbench.toy.train", description=__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pipeline folder to write")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/toy-train"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--cache-images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=6000, help="UNet training steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="end UNet training at this step, keeping the --steps learning-rate schedule "
        "(reproduces a run that was cut short; 0: run all --steps)",
    )
    p.add_argument("--checkpoint-every", type=int, default=250)
    # One thread: on a shared 2-core machine a 2-thread process stalls whenever
    # anything else runs (its threads wait on each other), tenfold slower.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0,
        help="stop UNet training after this long and save what there is (0: no limit)",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="save the pipeline from the last checkpoint without training further",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Tiny models trained from scratch produce denormal floats that slow CPUs ~40x.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    vae = train_vae(args)
    vae.requires_grad_(False)
    cache = cache_latents(args, vae)
    scale = latent_scale(cache)
    _log(f"latent scaling factor {scale:.4f}")
    models, ema = train_unet(args, cache, scale)
    export(args, vae, models, ema, scale)


if __name__ == "__main__":
    main()
