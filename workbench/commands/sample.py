"""``sample``: draw one image from a base (optionally with a student UNet swapped in)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from workbench.commands._common import add_base
from workbench.errors import WorkbenchError
from workbench.models import check_unet_folder, load_pipeline, resolve_base
from workbench.negative import NASA_POOLED_SCALE, NASA_SCALE, check_scale
from workbench.schedulers import check_sampler

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate one image from a prompt and a seed")
    add_base(p)
    p.add_argument("--prompt", required=True, help='e.g. "a large red circle on a white background, center"')
    p.add_argument(
        "--negative-prompt", default=None,
        help="what to steer away from (optional); guidance-free sampling (a w-conditioned student, or "
        "--guidance 1) takes it in the cross-attention and the pooled text embedding (NASA, --nasa-scale, "
        "--nasa-pooled-scale)",
    )  # fmt: skip
    p.add_argument(
        "--nasa-scale", type=float, default=NASA_SCALE,
        help=f"how hard guidance-free sampling steers the cross-attention away from the negative prompt "
        f"(0-2, default {NASA_SCALE:g})",
    )  # fmt: skip
    p.add_argument(
        "--nasa-pooled-scale", type=float, default=NASA_POOLED_SCALE,
        help="how hard it steers the pooled text embedding (SDXL family; 0-2, default "
        f"{NASA_POOLED_SCALE:g}: 1 takes out the prompt's content along the negative prompt's)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default 20; with --scheduler lcm 1-8, default 4)",
    )
    p.add_argument(
        "--scheduler", default="default",
        help="default (the pipeline's) or lcm (LCMScheduler, for consistency-distilled students: 1-8 steps; "
        "a w-conditioned student takes --guidance as an embedding, one UNet call per step)",
    )  # fmt: skip
    p.add_argument(
        "--guidance", type=float, default=None,
        help="classifier-free guidance scale (default: the base's, toy 2, others 5)",
    )  # fmt: skip
    p.add_argument("--unet", default=None, help="student UNet folder to sample with instead of the base's")
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg or .webp)")
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    """Reject bad options before any model is loaded."""
    if not args.prompt or not args.prompt.strip():
        raise WorkbenchError(
            "--prompt is empty; describe the image, e.g. 'a red circle on a white background'"
        )
    if args.steps is None:
        args.steps = 4 if args.scheduler == "lcm" else 20
    check_sampler(args.scheduler, args.steps)
    check_scale(args.nasa_scale, "--nasa-scale")
    check_scale(args.nasa_pooled_scale, "--nasa-pooled-scale")
    if args.guidance is not None and args.guidance < 0:
        raise WorkbenchError(f"--guidance must be >= 0 (1 or less disables guidance), got {args.guidance}")
    if args.unet:  # before any model loads: a wrong --unet fails in a blink
        check_unet_folder(args.unet)
    if Path(args.out).suffix.lower() not in _IMAGE_SUFFIXES:
        raise WorkbenchError(f"--out {args.out!r} needs an image suffix: {', '.join(_IMAGE_SUFFIXES)}")


def run(args: argparse.Namespace) -> int:
    validate(args)
    # not at the top: workbench.sampling loads diffusers' pipelines and transformers (seconds), which
    # building the CLI's parser (every command's module) must not
    from workbench.sampling import generate, load_student_unet

    torch.set_flush_denormal(True)  # tiny models hit denormals, which are slow on CPU
    base = resolve_base(args.base)
    pipe = load_pipeline(base)
    unet = load_student_unet(args.unet, pipe.unet) if args.unet else None
    (image,) = generate(
        pipe,
        [args.prompt],
        [args.seed],
        steps=args.steps,
        guidance=args.guidance if args.guidance is not None else base.guidance,
        negative_prompt=args.negative_prompt,
        unet=unet,
        scheduler=args.scheduler,
        nasa_scale=args.nasa_scale,
        nasa_pooled_scale=args.nasa_pooled_scale,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"saved {image.width}x{image.height} image to {out}")
    return 0
