"""Train the toy's latent reward proxy: ``python -m workbench.toy.reward``.

The toy checker (``checker.judge``) reads pixels and is not differentiable; reward-guided
LCD needs a score of latents it can climb. This trains a ``workbench.reward.LatentRewardModel``
(one logit per checker attribute) to predict the checker's verdict on (latents, prompt):

1. latents: seeded renders of *training* scenes through the toy VAE, and one-step predictions
   of the clean latents (from those latents noised to a random timestep) by the guided
   teacher and by an undistilled Vega-pruned student: blurred and wrong images, what an LCD
   student's one-step prediction looks like early on;
2. labels: every latent is decoded and ``checker.describe``d once; each is paired with the
   caption it was made from and with captions of the same split that change one or two
   attributes; the label of each attribute is the checker's verdict (right or wrong);
3. the model trains on the training split (BCE per attribute) and is scored on held-out
   scenes with held-out captions: per-attribute and full-prompt accuracy and AUC, by source.

The folder (config.json, model.safetensors, training.json with the command, metrics.json,
README.md) goes to ``workbench/assets/toy-sdxl/reward`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.data import Batches, _uncond, encode_text
from workbench.losses import x0_and_eps
from workbench.models import freeze_pipeline, load_pipeline
from workbench.presets import load_preset
from workbench.reward import LatentRewardModel, RewardConfig, base_dims, save_reward, toy_reward_dir
from workbench.surgery import build_student
from workbench.toy import checker, world

SOURCES = ("render", "teacher", "student")
GUIDANCE = (1.0, 3.0)  # the teacher's one-step predictions: guidance drawn from this range


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


@dataclass(frozen=True)
class Examples:
    """(latent, prompt) pairs with the checker's verdict on each attribute."""

    latents: torch.Tensor  # (N, 4, 16, 16) distinct latents
    index: torch.Tensor  # (M,) which latent each pair shows
    prompts: list[str]  # (M,)
    labels: torch.Tensor  # (M, 5) 1: the checker judges that attribute right
    sources: list[str]  # (M,) render | teacher | student


# --------------------------------------------------------------------------- latents


def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Rendered images (N, 3, H, W) in [-1, 1] -> latents as the UNet sees them."""
    with torch.no_grad():
        return pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor


def decode(pipe, latents: torch.Tensor, batch: int = 64) -> list:
    """Latents as the UNet sees them -> PIL images."""
    images = []
    for start in range(0, len(latents), batch):
        with torch.no_grad():
            x = pipe.vae.decode(latents[start : start + batch] / pipe.vae.config.scaling_factor).sample
        images += pipe.image_processor.postprocess(x, output_type="pil")
    return images


def text_inputs(pipe, prompts: list[str]) -> dict[str, Any]:
    """The UNet's text inputs for ``prompts`` (what an LCD batch carries as ``cond``)."""
    embeds, pooled = encode_text(pipe, prompts)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).expand(len(prompts), 6)
    return {
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }


def one_step_predictions(pipe, unet, latents, prompts, gen: torch.Generator, batch: int = 64) -> torch.Tensor:
    """The clean latents ``unet`` predicts in one step from ``latents`` noised to a uniform
    timestep, with classifier-free guidance drawn from ``GUIDANCE``."""
    schedule = Batches.schedule_of(pipe.scheduler.config)
    alphas, kind = schedule.alphas_cumprod.float(), schedule.config.prediction_type
    out = []
    for start in range(0, len(latents), batch):
        z, p = latents[start : start + batch], prompts[start : start + batch]
        b = len(z)
        t = torch.randint(0, len(alphas), (b,), generator=gen)
        a = alphas[t][:, None, None, None]
        x_t = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=gen)
        cond = text_inputs(pipe, p)
        e, pooled = _uncond(pipe, cond["encoder_hidden_states"], cond["added_cond_kwargs"]["text_embeds"])
        uncond = {"encoder_hidden_states": e.expand(b, *e.shape),
                  "added_cond_kwargs": {"text_embeds": pooled.expand(b, *pooled.shape),
                                        "time_ids": cond["added_cond_kwargs"]["time_ids"]}}  # fmt: skip
        scale = GUIDANCE[0] + (GUIDANCE[1] - GUIDANCE[0]) * torch.rand(b, generator=gen)
        with torch.no_grad():
            c, u = (unet(x_t, t, **text).sample for text in (cond, uncond))
        x0_c, x0_u = (x0_and_eps(v, x_t, a, kind)[0] for v in (c, u))
        out.append(x0_u + scale[:, None, None, None] * (x0_c - x0_u))
    return torch.cat(out)


def vega_student(pipe):
    """The teacher with Segmind Vega's blocks removed, not distilled (its predictions fail)."""
    student, _ = build_student(pipe.unet, load_preset("segmind-vega"))
    return student.eval().requires_grad_(False)


# --------------------------------------------------------------------------- prompts and labels


def swapped_captions(scene: world.Scene, pool: list[world.Scene], rng: random.Random, k: int) -> list[str]:
    """``k`` captions from ``pool`` that change one or two of ``scene``'s attributes."""
    near = [s for s in pool if 1 <= _distance(scene, s) <= 2]
    return [s.caption for s in rng.sample(near, min(k, len(near)))]


def _distance(a: world.Scene, b: world.Scene) -> int:
    return sum(getattr(a, f) != getattr(b, f) for f in ("shape", "colour", "background", "position", "size"))


def verdicts(seen: dict[str, str | None], prompt: str) -> list[float]:
    """The checker's verdict on each attribute of ``prompt`` for an image it described as ``seen``."""
    wanted = checker.parse_prompt(prompt)
    return [float(seen[a] == wanted[a]) for a in checker.ATTRIBUTES]


def make_examples(pipe, student, scenes: list[world.Scene], n: int, swaps: int, seed: int) -> Examples:
    """``n`` rendered scenes of ``scenes``, each as a render and as the teacher's and the
    student's one-step prediction, paired with its caption and ``swaps`` changed ones."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    picked = [world.sample_scene(rng, scenes) for _ in range(n)]
    images = torch.stack([_pixels(world.render(s, seed=rng.randrange(2**31))) for s in picked])
    z = torch.cat([encode_images(pipe, images[i : i + 64]) for i in range(0, n, 64)])
    captions = [s.caption for s in picked]
    latents = torch.cat([z, one_step_predictions(pipe, pipe.unet, z, captions, gen),
                         one_step_predictions(pipe, student, z, captions, gen)])  # fmt: skip
    seen = [checker.describe(image) for image in decode(pipe, latents)]
    index, prompts, labels, sources = [], [], [], []
    for i in range(len(latents)):
        scene = picked[i % n]
        for prompt in [scene.caption, *swapped_captions(scene, scenes, rng, swaps)]:
            index.append(i)
            prompts.append(prompt)
            labels.append(verdicts(seen[i], prompt))
            sources.append(SOURCES[i // n])
    return Examples(latents, torch.tensor(index), prompts, torch.tensor(labels), sources)


def _pixels(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


# --------------------------------------------------------------------------- training and scores


def text_table(pipe, prompts: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """Each distinct prompt's row, and the text inputs of all of them (encoded once)."""
    distinct = sorted(set(prompts))
    return {p: i for i, p in enumerate(distinct)}, text_inputs(pipe, distinct)


def select(cond: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    if isinstance(cond, dict):
        return {k: select(v, rows) for k, v in cond.items()}
    return cond[rows]


def fit(model: LatentRewardModel, ex: Examples, table, epochs: int, batch: int, lr: float, seed: int) -> None:
    rows, cond = table
    text_rows = torch.tensor([rows[p] for p in ex.prompts])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps, done = epochs * ((len(ex.prompts) + batch - 1) // batch), 0
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(ex.prompts), generator=gen), 0.0
        for start in range(0, len(order), batch):
            pick = order[start : start + batch]
            logits = model.logits(ex.latents[ex.index[pick]], select(cond, text_rows[pick]))
            loss = F.binary_cross_entropy_with_logits(logits, ex.labels[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total, done = total + loss.item() * len(pick), done + 1
        _log(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}")
    model.eval()


def predict(model: LatentRewardModel, ex: Examples, table, batch: int = 512) -> torch.Tensor:
    """(M, 5) logits of every pair."""
    rows, cond = table
    text_rows = torch.tensor([rows[p] for p in ex.prompts])
    out = []
    with torch.no_grad():
        for start in range(0, len(ex.prompts), batch):
            pick = torch.arange(start, min(start + batch, len(ex.prompts)))
            out.append(model.logits(ex.latents[ex.index[pick]], select(cond, text_rows[pick])))
    return torch.cat(out)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (ties count half); None when one class is missing."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return round(float(greater + 0.5 * ties), 4)


def agreement(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy and AUC per attribute and for the full prompt (all five right: the score is
    the sum of log-sigmoids, judged right above log 0.5); base rates beside them."""
    result: dict[str, Any] = {"pairs": len(labels)}
    for k, name in enumerate(checker.ATTRIBUTES):
        right = labels[:, k]
        result[name] = {"accuracy": round(float(((logits[:, k] > 0) == (right > 0.5)).float().mean()), 4),
                        "auc": auc(logits[:, k], right), "judged_right": round(float(right.mean()), 4)}  # fmt: skip
    score, full = F.logsigmoid(logits).sum(1), labels.min(1).values
    result["full"] = {"accuracy": round(float(((score > -0.6931) == (full > 0.5)).float().mean()), 4),
                      "auc": auc(score, full), "judged_right": round(float(full.mean()), 4)}  # fmt: skip
    return result


def report(model, ex: Examples, table) -> dict[str, Any]:
    """``agreement`` over all pairs and by source."""
    logits = predict(model, ex, table)
    result = {"all": agreement(logits, ex.labels)}
    for source in SOURCES:
        mask = torch.tensor([s == source for s in ex.sources])
        result[source] = agreement(logits[mask], ex.labels[mask])
    return result


# --------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workbench.toy.reward", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-scenes", type=int, default=2400, help="rendered training scenes (x3 sources)")
    p.add_argument("--eval-scenes", type=int, default=400, help="rendered held-out scenes (x3 sources)")
    p.add_argument("--swaps", type=int, default=4, help="changed captions per latent")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=toy_reward_dir())
    return p.parse_args(argv)


def command(args: argparse.Namespace) -> str:
    defaults = parse_args([])
    parts = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and v != getattr(defaults, k)
    ]
    return " ".join(["python -m workbench.toy.reward", *parts])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.time()
    pipe = freeze_pipeline(load_pipeline("toy"))
    student = vega_student(pipe)
    train = make_examples(pipe, student, world.train_scenes(), args.train_scenes, args.swaps, args.seed)
    held = make_examples(pipe, student, world.held_out_scenes(), args.eval_scenes, args.swaps, args.seed + 1)
    _log(f"examples: {len(train.prompts)} training pairs, {len(held.prompts)} held-out pairs "
         f"({time.time() - started:.0f} s)")  # fmt: skip
    table = text_table(pipe, train.prompts + held.prompts)
    torch.manual_seed(args.seed)
    config = RewardConfig(**base_dims(pipe.unet.config), heads=checker.ATTRIBUTES, width=args.width)
    model = LatentRewardModel(config)
    fit(model, train, table, args.epochs, args.batch, args.lr, args.seed)
    metrics = {"held_out": report(model, held, table), "train": report(model, train, table)["all"]}
    minutes = round((time.time() - started) / 60, 2)
    cpu_minutes = round(time.process_time() / 60, 2)
    training = {"command": command(args), **{k: v for k, v in vars(args).items() if k != "out"},
                "training_pairs": len(train.prompts), "held_out_pairs": len(held.prompts),
                "parameters": sum(p.numel() for p in model.parameters()), "minutes": minutes,
                "cpu_minutes": cpu_minutes,
                "torch": torch.__version__}  # fmt: skip
    save_reward(model, args.out, {"training.json": training, "metrics.json": metrics})
    (args.out / "README.md").write_text(readme(training, metrics["held_out"]), encoding="utf-8")
    _log(json.dumps(metrics["held_out"]["all"]))
    _log(f"saved to {args.out} in {minutes} min")
    return 0


def readme(training: dict[str, Any], held: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{held[s][name]['accuracy']:.3f} / {held[s][name]['auc'] or float('nan'):.3f}"
                                    for s in ("all", *SOURCES)) + " |"
        for name in (*checker.ATTRIBUTES, "full")
    )  # fmt: skip
    return f"""# Toy latent reward proxy

A `workbench.reward.LatentRewardModel` ({training["parameters"]:,} parameters) that predicts the toy
checker's verdict on each attribute of a prompt from the UNet's latents (4 x 16 x 16, scaled) and
the prompt's text inputs (token embeddings and pooled vector). Its score, the sum of the
log-sigmoids of the five logits, is the log-probability that the checker judges the whole prompt
right. Used by `--lcd-reward toy` (reward-guided LCD).

Made by `{training["command"]}` in {training["minutes"]} minutes ({training["cpu_minutes"]} CPU minutes,
{training["threads"]} thread; the same command gives the same weights):
{training["training_pairs"]:,} (latent, prompt) pairs from training scenes (renders through the toy
VAE, and one-step predictions of the guided teacher and of an undistilled Vega-pruned student from
noised latents; each with its caption and {training["swaps"]} captions that change one or two
attributes), labels from `checker.describe` of the decoded latents.

Agreement with the checker on {held["all"]["pairs"]:,} held-out pairs (held-out scenes and
captions), accuracy / AUC, by source of the latents:

| attribute | all | render | teacher | student |
|---|---|---|---|---|
{rows}

Full prompt: all five attributes right (score above log 0.5). `metrics.json` has the base rates
(`judged_right`) and the figures on the training pairs.
"""


if __name__ == "__main__":
    raise SystemExit(main())
