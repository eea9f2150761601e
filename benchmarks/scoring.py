"""Shared scoring for the quality benchmarks: every student on the same held-out samples.

The teacher draws its images once per process; each student's per-sample scores are kept
beside its UNet (``eval-<settings>.json``; FID/KID to the teacher's images, when the
evaluator's metrics ask for them, in ``eval-<settings>-sets.json``), so a re-run scores only
what is new, and any two students compare paired (same prompts, same seeds, same bootstrap
resamples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from workbench import evaluation as ev
from workbench.models import load_pipeline, resolve_base
from workbench.stats import Estimate


def add_sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: all 81)")
    p.add_argument(
        "--seeds", type=int, default=ev.TOY_SEEDS, help=f"seeds per prompt (default {ev.TOY_SEEDS})"
    )


def add_training_options(
    p: argparse.ArgumentParser, *, steps: int, samples: int, preset_help: str | None = None,
    steps_help: str | None = None,
) -> None:  # fmt: skip
    """The distillation options every toy quality benchmark takes: teacher, preset student,
    steps, batch size, learning rate and cached training images (only the defaults differ)."""
    p.add_argument("--base", default="toy")
    p.add_argument("--preset", default="segmind-vega", help=preset_help)
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=samples, help="cached toy training images")


def variant_names(p: argparse.ArgumentParser, variants: str, known: dict[str, Any]) -> list[str]:
    """The comma-separated ``--variants`` as a list; exits with the valid names if one is unknown."""
    names = variants.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(known)}")
    return names


def claim(out: Path, base: str) -> None:
    """Tie an output folder to the teacher's weights: the students and cached scores in it
    are only valid for those, so a folder made from other weights is refused."""
    resolved = resolve_base(base)
    if resolved.kind not in ("toy", "pipeline"):
        return
    digest = ev.weights_digest(Path(resolved.location) / "unet")
    stamp = out / "teacher-unet.sha256"
    if stamp.exists() and stamp.read_text().strip() != digest:
        raise SystemExit(
            f"{out} holds students and scores of other teacher weights than {base!r} has now; give a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{digest}\n")


def evaluator(base: str, prompts: int | None, seeds: int, metrics: ev.Metrics | None = None) -> ev.Evaluator:
    resolved = resolve_base(base)
    samples = ev.default_samples(resolved.kind == "toy", prompts, seeds)
    return ev.Evaluator(
        load_pipeline(resolved), samples, checker=resolved.kind == "toy", guidance=resolved.guidance,
        metrics=metrics or ev.Metrics(),
    )  # fmt: skip


def _cache_name(e: ev.Evaluator) -> str:
    s = e.settings
    return f"eval-{s['prompts']}x{s['seeds']}-{s['steps']}steps-g{s['guidance']:g}.json"


def _sets_key(e: ev.Evaluator) -> dict[str, Any] | None:
    """What a student's cached FID/KID depend on beyond the samples; ``None``: none asked for."""
    m = e.metrics
    if not m.wants_sets:
        return None
    return {
        "metrics": [n for n in ev.SETS if n in m.names],
        "features": m.fid_features,
        "eval_size": m.eval_size,
    }


def student_scores(e: ev.Evaluator, unet_dir: Path) -> ev.Scores:
    """Per-sample scores of the UNet in ``unet_dir`` (and its FID/KID to the teacher's images
    when ``e.metrics`` asks for them), from its cache files or drawn now. A student scored before
    FID/KID were asked for is drawn again (a toy student's images take a minute or two)."""
    from workbench.sampling import load_student_unet

    cache = unet_dir.parent / f"{unet_dir.name}-{_cache_name(e)}"
    sets_cache, key = cache.with_name(f"{cache.stem}-sets.json"), _sets_key(e)
    sets = json.loads(sets_cache.read_text()) if key is not None and sets_cache.exists() else None
    if cache.exists() and (key is None or (sets is not None and sets["key"] == key)):
        scores = ev.Scores.from_rows(json.loads(cache.read_text()), e.samples)
        scores.sets = sets["sets"] if sets is not None else {}
        return scores
    scores = e.student(load_student_unet(unet_dir, e.pipe.unet))
    cache.write_text(json.dumps(scores.rows()) + "\n")
    if key is not None:
        sets_cache.write_text(json.dumps({"key": key, "sets": scores.sets}) + "\n")
    return scores


def rank_correlation(x: dict[str, float], y: dict[str, float]) -> dict[str, Any]:
    """Spearman's rank correlation of two figures over the names both have: Pearson's of their
    ranks, tied values sharing the average rank (as ``method="spearman"``, which needs scipy);
    ``rho`` is ``None`` below 3 names or where one figure is constant."""
    shared = [k for k in x if k in y]
    ranks = [pd.Series([f[k] for k in shared], dtype=float).rank() for f in (x, y)]
    rho = ranks[0].corr(ranks[1])
    return {"rho": None if len(shared) < 3 or pd.isna(rho) else float(rho), "n": len(shared), "names": shared}


def figures(e: ev.Evaluator, scores: ev.Scores, reference: ev.Scores | None = None) -> dict[str, Any]:
    """Every figure of a student with its interval; with a reference, paired comparisons too."""
    out: dict[str, Any] = {"summary": ev.summarise(e, scores)}  # FID/KID among them, when computed
    out["vs_teacher"] = ev.as_dicts(e.versus(scores, e.teacher()))
    if reference is not None:
        out["minus_reference"] = ev.as_dicts(e.difference(scores, reference))
    return out


def cell(est: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.912 [0.887, 0.934]`` for a table cell, ``-`` for none."""
    return "-" if est is None else Estimate.from_dict(est).format(digits)


def diff_cell(est: dict[str, Any] | None, digits: int = 3) -> str:
    """A paired difference; bold where its interval excludes 0 (the two really differ)."""
    if est is None:
        return "-"
    e = Estimate.from_dict(est)
    text = f"{e.mean:+.{digits}f} [{e.low:+.{digits}f}, {e.high:+.{digits}f}]"
    return f"**{text}**" if e.low > 0 or e.high < 0 else text


def header(e: ev.Evaluator, base: str) -> str:
    s, iv = e.settings, e.bootstrap.describe()
    return (
        f"{base}: {s['samples']} held-out samples ({s['prompts']} prompts x {s['seeds']} seeds), "
        f"{s['steps']} steps, guidance {s['guidance']:g}; mean [{iv['level']:.0%} interval: {iv['method']}, "
        f"{iv['resamples']} resamples]"
    )


def table(rows: list[tuple[str, list[str]]], head: list[str]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows]
    return lines
