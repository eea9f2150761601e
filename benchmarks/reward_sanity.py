"""One-step predictions of consistency students, scored by the toy reward proxy and by the
toy checker: does reward guidance (RG-LCD) move them the right way?

    python benchmarks/reward_sanity.py runs/vega-lcd/student runs/vega-rglcd/student --scenes 64

Held-out scenes rendered through the toy VAE are noised (fixed seed) to each timestep of the
4-step LCM grid; each student's consistency output there (guidance embedding 2, the toy's
scale) is its one-step prediction of the clean latents. Printed per student and timestep:
the proxy's mean reward (log-probability that the checker accepts the whole prompt) and the
checker's full-prompt accuracy on the decoded prediction (t = 999 is pure noise: a one-step
sample).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def one_step(unet, latents, t, cond, setup, scale: float) -> torch.Tensor:
    from workbench.losses import consistency_function
    from workbench.schedulers import guidance_embedding

    dim = unet.config.get("time_cond_proj_dim")
    w = guidance_embedding(torch.full((len(latents),), scale), dim) if dim else None
    with torch.no_grad():
        return consistency_function(unet, latents, t, w, cond, setup)


def main() -> None:
    from diffusers import UNet2DConditionModel

    from workbench.data import Batches
    from workbench.losses import LCDSetup
    from workbench.models import freeze_pipeline, load_pipeline, resolve_base
    from workbench.reward import load_reward
    from workbench.toy import reward as toy
    from workbench.toy import world

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("students", nargs="+", help="student UNet folders (RUN_DIR/student)")
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    pipe = freeze_pipeline(load_pipeline("toy"))
    proxy = load_reward("toy", resolve_base("toy"))
    rng, scenes = random.Random(args.seed), world.held_out_scenes()
    picked = [world.sample_scene(rng, scenes) for _ in range(args.scenes)]
    images = torch.stack([toy._pixels(world.render(s, seed=rng.randrange(2**31))) for s in picked])
    clean, cond = toy.encode_images(pipe, images), toy.text_inputs(pipe, [s.caption for s in picked])
    schedule = Batches.schedule_of(pipe.scheduler.config)
    alphas = schedule.alphas_cumprod.float()
    setup = LCDSetup(alphas, schedule.config.prediction_type, (1.0, 1.0), None)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed))
    print(
        f"{args.scenes} held-out scenes; mean proxy reward / checker full-prompt accuracy of the one-step prediction"
    )
    print(f"{'student':40s}" + "".join(f"{f't={t}':>18s}" for t in (999, 759, 499, 259)))
    for folder in args.students:
        unet = UNet2DConditionModel.from_pretrained(folder).eval()
        cells = []
        for t in (999, 759, 499, 259):
            a = alphas[t]
            x_t = a.sqrt() * clean + (1 - a).sqrt() * noise
            pred = one_step(unet, x_t, torch.full((len(clean),), t), cond, setup, args.guidance)
            with torch.no_grad():
                reward = proxy(pred, cond).mean().item()
            verdicts = [
                toy.checker.judge(i, s.caption).full_ok for i, s in zip(toy.decode(pipe, pred), picked)
            ]
            cells.append(f"{reward:8.3f} / {sum(verdicts) / len(verdicts):.3f}")
        print(f"{folder[-40:]:40s}" + "".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
