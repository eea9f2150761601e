"""Negative prompts without guidance: does NASA (negative-away steer attention) suppress
what the negative prompt names?

Guidance-free sampling has no unconditional pass for a negative prompt: a w-conditioned
(LCD) student at few LCM steps (``--unet``), or the toy teacher at guidance 1. Each held-out
toy prompt is drawn without a negative prompt and with its own colour word as the negative
prompt, at each NASA scale; the toy checker reads every image's colour. *Named colour seen*
is the fraction of images whose colour is the one the prompt (and the negative prompt)
names: NASA works if it falls as the scale grows, while shape accuracy (not named) holds.

    OMP_NUM_THREADS=1 python benchmarks/nasa.py [--unet RUN/student --scheduler lcm --steps 4]
        [--prompts 20] [--seeds 2] [--scales 0,0.5,1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from workbench import evaluation as ev
from workbench.models import load_pipeline, resolve_base
from workbench.sampling import generate, load_student_unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--unet", default=None, help="a guidance-free (w-conditioned) student; default: the teacher"
    )
    p.add_argument("--scheduler", default="default")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0, help="1: no classifier-free guidance")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--scales", default="0,0.5,1")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    pipe = load_pipeline(resolve_base("toy"))
    unet = load_student_unet(args.unet, pipe.unet) if args.unet else None
    samples = ev.samples(ev.toy_prompts(args.prompts), args.seeds)
    prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]
    colour_of = {s.prompt: s.prompt.split()[2] for s in samples}  # "a {size} {colour} {shape} on ..."
    who = (
        f"{args.unet} ({args.steps} {args.scheduler} steps)"
        if args.unet
        else f"toy teacher ({args.steps} steps)"
    )
    print(
        f"{who}, guidance {args.guidance:g}, {len(samples)} samples ({args.prompts} prompts x {args.seeds} seeds)\n"
    )
    print("| negative prompt | NASA scale | named colour seen | shape right |\n|---|---|---|---|")
    runs = [("none", 0.0)] + [("the prompt's colour", float(x)) for x in args.scales.split(",")]
    for label, scale in runs:
        images = []
        for prompt, seed in zip(prompts, seeds):  # one negative prompt per sample: its own colour
            negative = colour_of[prompt] if label != "none" else None
            images += generate(pipe, [prompt], [seed], steps=args.steps, guidance=args.guidance, unet=unet,
                               scheduler=args.scheduler, negative_prompt=negative, nasa_scale=scale)  # fmt: skip
        values, _ = ev.judge(images, samples)
        print(
            f"| {label} | {scale:g} | {np.mean(values['colour']):.3f} | {np.mean(values['shape']):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
