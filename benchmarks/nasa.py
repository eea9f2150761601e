"""Negative prompts without guidance: does NASA (negative-away steering) suppress what the
negative prompt names, and leave the rest alone?

Guidance-free sampling has no unconditional pass for a negative prompt: a w-conditioned
(LCD) student at few LCM steps (``--unet``), or the toy teacher at guidance 1. Each held-out
toy prompt is drawn once without a negative prompt, then, for every attribute the toy checker
reads, with the prompt's own word(s) for it as the negative prompt ("red", "circle", "white
background", "top left", "large"), at each NASA scale. *Prompt's value seen*: the fraction
of images that still show the value the prompt (and the negative prompt) names; NASA works if
it falls below the no-negative row. *Others right*: the mean accuracy of the four attributes
not named (they should hold). A last check names a *different* colour than the prompt's:
the image's colour should stay. Means with 95% intervals (cluster bootstrap over prompts); differences
to no negative prompt are paired (same samples, same resamples), bold where the interval
excludes 0.

``--scales`` lists NASA settings, each ``A/P`` (cross-attention scale A, pooled scale P) or
one number for both. ``--parts`` picks what NASA steers: ``both`` (what ``generate`` does: the
cross-attention, and the pooled text embedding of SDXL-family UNets), ``attention`` (the
cross-attention alone, NASA before the pooled steering) or ``pooled`` (the pooled embedding
alone).

    OMP_NUM_THREADS=1 python benchmarks/nasa.py [--unet RUN/student --scheduler lcm --steps 4
        --guidance 2] [--prompts 20] [--seeds 2] [--scales 0.5/1,0.5/2,1/2] [--parts both]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scoring import cell, diff_cell, table

from workbench import evaluation as ev
from workbench.models import load_pipeline, resolve_base
from workbench.negative import negative_away, pooled_negative
from workbench.sampling import generate, load_student_unet
from workbench.stats import Bootstrap
from workbench.toy import checker
from workbench.toy.world import COLOURS

OTHER_COLOUR = "other colour"
KINDS = (*checker.ATTRIBUTES, OTHER_COLOUR)


def negative_words(kind: str, wanted: dict[str, str]) -> str:
    """The negative prompt of one sample: its own word(s) for ``kind``, or for ``OTHER_COLOUR``
    the next colour of the world's list (never the prompt's own)."""
    if kind == OTHER_COLOUR:
        names = list(COLOURS)
        return names[(names.index(wanted["colour"]) + 1) % len(names)]
    return f"{wanted[kind]} background" if kind == "background" else wanted[kind]


def verdicts(kind: str, seen: list[dict], wanted: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: is the attribute ``kind`` names (colour for ``OTHER_COLOUR``) the prompt's
    value, and the mean accuracy of the other four attributes."""
    key = "colour" if kind == OTHER_COLOUR else kind
    named = np.array([float(s[key] == w[key]) for s, w in zip(seen, wanted)])
    others = [a for a in checker.ATTRIBUTES if a != key]
    rest = np.array([np.mean([s[a] == w[a] for a in others]) for s, w in zip(seen, wanted)])
    return named, rest


def parse_scales(text: str) -> list[tuple[float, float]]:
    """``"0.5/2,1"`` -> ``[(0.5, 2.0), (1.0, 1.0)]``: (cross-attention, pooled) scales."""
    pairs = [part.split("/") for part in text.split(",")]
    return [(float(p[0]), float(p[-1])) for p in pairs]


def steering(pipe, unet, negative: str, scale: tuple[float, float], parts: str):
    """The benchmark's own NASA context for ``--parts attention|pooled``, built from
    ``workbench.negative`` as ``generate`` builds it."""
    encode = functools.partial(pipe.encode_prompt, device=pipe.device, num_images_per_prompt=1,
                               do_classifier_free_guidance=False)  # fmt: skip
    with torch.no_grad():
        embeds, _, pooled, _ = encode(negative)
        pooled = pooled_negative(pooled, encode("")[2]) if parts == "pooled" else None
    attention = scale[0] if parts == "attention" else 0.0
    return negative_away(unet, embeds, attention, pooled, pooled_scale=scale[1])


def draw(pipe, unet, samples, negatives, scale, parts, kw) -> list:
    """One image per sample; samples sharing a negative prompt are drawn in one batch."""
    images: list = [None] * len(samples)
    for negative in dict.fromkeys(negatives):
        idx = [i for i, n in enumerate(negatives) if n == negative]
        prompts, seeds = [samples[i].prompt for i in idx], [samples[i].seed for i in idx]
        if negative is None or parts == "both":
            out = generate(pipe, prompts, seeds, unet=unet, negative_prompt=negative, nasa_scale=scale[0],
                           nasa_pooled_scale=scale[1], **kw)  # fmt: skip
        else:
            with steering(pipe, unet or pipe.unet, negative, scale, parts):
                out = generate(pipe, prompts, seeds, unet=unet, **kw)
        for i, image in zip(idx, out):
            images[i] = image
    return images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--unet", default=None, help="a guidance-free (w-conditioned) student; default: the teacher"
    )
    p.add_argument("--scheduler", default="default")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=1.0, help="1: no classifier-free guidance")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument(
        "--scales", default="0.5/1,0.5/2,1/2", help="A/P (attention/pooled), or one number for both"
    )
    p.add_argument("--parts", choices=("both", "attention", "pooled"), default="both")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    pipe = load_pipeline(resolve_base("toy"))
    unet = load_student_unet(args.unet, pipe.unet) if args.unet else None
    samples = ev.samples(ev.toy_prompts(args.prompts), args.seeds)
    wanted = [checker.parse_prompt(s.prompt) for s in samples]
    boot = Bootstrap([s.group for s in samples])
    kw = {"steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler}
    who = (
        f"{args.unet} ({args.steps} {args.scheduler} steps)"
        if args.unet
        else f"toy teacher ({args.steps} steps)"
    )
    print(f"{who}, guidance {args.guidance:g}, NASA on {args.parts}, {len(samples)} held-out samples "
          f"({args.prompts} prompts x {args.seeds} seeds); mean [95% interval, cluster bootstrap over prompts]\n")  # fmt: skip
    start = time.time()
    none = [None] * len(samples)
    plain = [checker.describe(im) for im in draw(pipe, unet, samples, none, (0.0, 0.0), args.parts, kw)]
    rows = []
    for kind in KINDS:
        named0, rest0 = verdicts(kind, plain, wanted)
        rows.append((f"{kind}: none", ["-", cell(boot.mean(named0).to_dict()), "-", cell(boot.mean(rest0).to_dict()), "-"]))  # fmt: skip
        negatives = [negative_words(kind, w) for w in wanted]
        for scale in parse_scales(args.scales):
            seen = [
                checker.describe(im) for im in draw(pipe, unet, samples, negatives, scale, args.parts, kw)
            ]
            named, rest = verdicts(kind, seen, wanted)
            rows.append((f"{kind}: {'a different colour' if kind == OTHER_COLOUR else 'its own'}", [
                "/".join(f"{x:g}" for x in scale), cell(boot.mean(named).to_dict()),
                diff_cell(boot.difference(named, named0).to_dict()),
                cell(boot.mean(rest).to_dict()), diff_cell(boot.difference(rest, rest0).to_dict()),
            ]))  # fmt: skip
        print(f"{kind} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    head = [
        "negative prompt",
        "NASA scales (attention/pooled)",
        "prompt's value seen",
        "vs none",
        "others right",
        "vs none",
    ]
    print("\n".join(table(rows, head)))
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
