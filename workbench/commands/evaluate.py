"""``evaluate``: how well the teacher (and a student) follow prompts, and how close the
student's images stay to the teacher's on the same samples, each with a 95% interval.

On the toy base, prompts are the held-out captions (never seen in training) and the toy
checker judges all five attributes; other bases have no checker and report only the
student's PSNR/SSIM against the teacher; ``--metrics`` adds FID/KID, CLIP score, PickScore
and LPIPS. See the ``workbench/evaluation`` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from workbench import evaluation as ev
from workbench.commands._common import add_base, add_json, emit_json
from workbench.errors import WorkbenchError
from workbench.evaluation import clip as cliplib
from workbench.evaluation import distribution, suite
from workbench.evaluation import images as imagestore
from workbench.evaluation import prompts as promptfile
from workbench.evaluation.home import card_section, home_of
from workbench.models import Base, check_unet_folder, load_pipeline, resolve_base
from workbench.progress import Progress
from workbench.schedulers import SCHEDULERS, check_sampler


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="prompt accuracy on held-out toy prompts; with --unet, the student's too and PSNR/SSIM",
    )
    add_base(p)
    p.add_argument("--unet", default=None, help="student UNet folder to compare with the teacher")
    p.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="number of prompts, spread over the list (default: all 81 held-out toy captions, "
        f"or all {len(ev.GENERIC_PROMPTS)} generic prompts on other bases)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per prompt (default {ev.TOY_SEEDS} on the toy, {ev.GENERIC_SEEDS} elsewhere)",
    )
    p.add_argument("--steps", type=int, default=ev.STEPS, help=f"denoising steps (default {ev.STEPS})")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the base's, toy 2, others 5)"
    )
    p.add_argument(
        "--student-scheduler", default="default", choices=SCHEDULERS,
        help="scheduler the student samples with: default (the pipeline's) or lcm (consistency-distilled "
        "students, 1-8 steps); the teacher always uses the pipeline's",
    )  # fmt: skip
    p.add_argument("--student-steps", type=int, default=None, help="the student's steps (default: --steps)")
    p.add_argument(
        "--student-guidance", type=float, default=None,
        help="the student's guidance scale (default: --guidance); a w-conditioned (LCD) student takes it "
        "as an embedding, in one UNet call per step",
    )  # fmt: skip
    p.add_argument(
        "--save", default=None, help="also write the full result, per-sample scores included, as JSON"
    )
    add_metrics(p)
    add_json(p)
    p.set_defaults(func=run)


def add_metrics(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics the field reports (README: Evaluation)")
    g.add_argument(
        "--metrics", default=",".join(suite.DEFAULT),
        help=f"comma-separated, from {', '.join(suite.METRICS)}; psnr and ssim are always computed for a student",
    )  # fmt: skip
    g.add_argument("--prompt-file", default=None, help="a .txt (one prompt a line) or .jsonl (prompt/caption/"
                   "text key) of prompts; --prompts N takes N spread evenly over it")  # fmt: skip
    g.add_argument("--clip-model", default=None, help="CLIP model for clip (and --fid-features clip): a local "
                   "folder or a hub id, e.g. openai/clip-vit-large-patch14")  # fmt: skip
    g.add_argument("--pickscore-model", default=cliplib.PICKSCORE_MODEL, help="CLIP model for pickscore")
    g.add_argument("--pickscore-processor", default=cliplib.PICKSCORE_PROCESSOR,
                   help="processor (tokenizer, image preprocessing) for pickscore (default: the one PickScore "
                   f"was trained with, {cliplib.PICKSCORE_PROCESSOR})")  # fmt: skip
    g.add_argument("--fid-features", default=None, choices=distribution.FEATURES,
                   help="feature extractor of fid/kid (default: pixels on the toy, which has no Inception "
                   "offline; inception elsewhere, which needs torch-fidelity)")  # fmt: skip
    g.add_argument("--reference", default=None, help="image folder fid/kid compare with (e.g. COCO val2014); "
                   "default: the teacher's images of the same samples")  # fmt: skip
    g.add_argument("--eval-size", type=int, default=None, help="centre-crop and resize every image (generated "
                   "and reference) to this side before fid/kid/clip/pickscore, e.g. 256 as BK-SDM "
                   "(default: as drawn)")  # fmt: skip
    g.add_argument("--reference-count", type=int, default=None, help="use this many reference images, spread "
                   "over the folder's sorted files (default: all)")  # fmt: skip
    g.add_argument("--out", default="auto", help="folder for evaluation.json and the images (teacher/, "
                   "student/): 'auto' = RUN/evaluation for a run's student, EXPORT/evaluation for an "
                   "export (whose model card gains the results); 'none' keeps nothing")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def metrics_of(args: argparse.Namespace, base: Base) -> suite.Metrics:
    """The chosen metrics, validated (the toy draws FID features from pixels by default)."""
    features = args.fid_features or ("pixels" if base.kind == "toy" else "inception")
    return suite.Metrics(
        suite.parse(args.metrics), clip_model=args.clip_model, pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor, fid_features=features, reference=args.reference,
        reference_count=args.reference_count, eval_size=args.eval_size,
    )  # fmt: skip


def stderr_progress(fraction: float, message: str) -> None:
    print(f"evaluate: {message} ({fraction:.0%})", file=sys.stderr, flush=True)


def validate(args: argparse.Namespace) -> None:
    for name in ("prompts", "seeds", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise WorkbenchError(f"--{name} must be a positive integer, got {value}")
    for name in ("guidance", "student_guidance"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise WorkbenchError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.student_steps is not None or args.student_scheduler != "default":
        if not args.unet:
            raise WorkbenchError("--student-scheduler/--student-steps/--student-guidance need --unet")
        steps = args.student_steps if args.student_steps is not None else args.steps
        check_sampler(args.student_scheduler, steps, "--student-steps")
    if args.unet:  # before any model loads: a wrong --unet fails in a blink
        check_unet_folder(args.unet)
    if args.save and Path(args.save).suffix.lower() != ".json":
        raise WorkbenchError(f"--save {args.save!r} must name a .json file")
    if args.reference_count is not None and args.reference_count < 2:
        raise WorkbenchError(f"--reference-count must be at least 2, got {args.reference_count}")
    suite.parse(args.metrics)


def evaluate(
    args: argparse.Namespace, progress: Progress | None = None
) -> tuple[dict[str, Any], ev.Evaluator]:
    """The full result (``per_sample`` included; see ``evaluation.result``) and its evaluator;
    ``progress`` hears of every batch (default: lines on stderr, unless ``--quiet``)."""
    base = resolve_base(args.base)
    is_toy = base.kind == "toy"
    metrics = metrics_of(args, base)
    if not is_toy and not args.unet and not _scores_teacher(metrics):
        raise WorkbenchError(
            f"base {base.name!r} has no prompt checker (only the toy has one); give --unet DIR "
            "to compare a student with it, or --metrics clip/pickscore (or fid/kid with --reference)"
        )
    metrics.check_available()
    samples = sample_list(args, is_toy)
    # not at the top: workbench.sampling loads diffusers' pipelines and transformers (seconds), which
    # building the CLI's parser (every command's module) must not
    from workbench.sampling import load_student_unet

    pipe = load_pipeline(base)
    student = load_student_unet(args.unet, pipe.unet) if args.unet else None
    guidance = args.guidance if args.guidance is not None else base.guidance
    out = output_folder(args)
    evaluator = ev.Evaluator(
        pipe, samples, checker=is_toy, steps=args.steps, guidance=guidance, metrics=metrics,
        teacher_key=teacher_key(base, samples, args.steps, guidance), out=out,
        progress=progress or (None if args.quiet else stderr_progress),
    )  # fmt: skip
    sampler = student_sampler(args, guidance)
    teacher = evaluator.teacher()
    scores = evaluator.student(student, sampler) if student is not None else None
    return ev.result(evaluator, base, teacher, scores, args.unet, sampler), evaluator


def _scores_teacher(metrics: suite.Metrics) -> bool:
    return any(n in metrics.names for n in ev.PER_SAMPLE) or (
        metrics.wants_sets and metrics.reference is not None
    )


def sample_list(args: argparse.Namespace, is_toy: bool) -> list[ev.Sample]:
    """The prompt file's prompts (``--prompts`` of them, spread) or the base's default samples."""
    if args.prompt_file is None:
        return ev.default_samples(is_toy, args.prompts, args.seeds)
    chosen = promptfile.pick(promptfile.read(args.prompt_file), args.prompts)
    return ev.samples(chosen, args.seeds or ev.GENERIC_SEEDS)


def teacher_key(base: Base, samples: list[ev.Sample], steps: int, guidance: float) -> dict[str, Any]:
    weights = imagestore.stamp(Path(base.location) / "unet") if base.kind in ("toy", "pipeline") else None
    return imagestore.teacher_key(base.name, base.location, weights, [s.prompt for s in samples],
                                  [s.seed for s in samples], steps, guidance)  # fmt: skip


def output_folder(args: argparse.Namespace) -> Path | None:
    if args.out == "none":
        return None
    if args.out != "auto":
        return Path(args.out)
    home = home_of(args.unet) if args.unet else None
    return home.folder if home else None


def student_sampler(args: argparse.Namespace, guidance: float) -> ev.Sampler | None:
    """The student's own way of sampling, if the flags give it one."""
    given = (args.student_steps, args.student_guidance)
    if args.student_scheduler == "default" and all(v is None for v in given):
        return None
    return ev.Sampler(
        steps=args.student_steps if args.student_steps is not None else args.steps,
        guidance=args.student_guidance if args.student_guidance is not None else guidance,
        scheduler=args.student_scheduler,
    )


def run(args: argparse.Namespace) -> int:
    summary, written = evaluate_and_keep(args)
    if args.json:
        emit_json(summary)
        return 0
    print("\n".join(ev.format_result(summary)))
    for path in written:
        print(f"  written: {path}")
    return 0


def keep(args: argparse.Namespace, result: dict[str, Any], evaluator: ev.Evaluator) -> list[str]:
    """Write the record beside its images, and the results into the export's model card."""
    if evaluator.out is None:
        return []
    home = home_of(args.unet) if args.unet and args.out == "auto" else None
    if home is not None:  # the record travels with the run or export: no local path in it
        result = result | {"unet": Path(args.unet).name}
    record = Path(evaluator.out) / "evaluation.json"
    ev.write_record(record, result)
    if home is not None and home.card is not None:
        card_section(home.card, ev.format_result(result))
        return [str(record), str(home.card)]
    return [str(record)]


def arguments(**given: Any) -> argparse.Namespace:
    """The command's options with their defaults and ``given`` set: how the app asks for an
    evaluation without a command line. Unknown names are an error."""
    parser = argparse.ArgumentParser(prog="evaluate")
    register(parser.add_subparsers())
    args = parser.parse_args(["evaluate"])
    unknown = sorted(set(given) - set(vars(args)))
    if unknown:
        raise WorkbenchError(f"unknown evaluate options {unknown}")
    return argparse.Namespace(**(vars(args) | given))


def evaluate_and_keep(
    args: argparse.Namespace, progress: Progress | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Validate, evaluate, and write the result where it belongs (``--save``, and the run's or
    export's evaluation folder); the summary (no per-sample rows) and the files written."""
    validate(args)
    torch.set_flush_denormal(True)  # tiny models hit denormals, which are slow on CPU
    result, evaluator = evaluate(args, progress)
    if args.save:
        ev.write_record(args.save, result)
    written = ([args.save] if args.save else []) + keep(args, result, evaluator)
    return {k: v for k, v in result.items() if k != "per_sample"}, written
