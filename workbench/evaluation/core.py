"""Held-out evaluation: a teacher and its students scored on the same (prompt, seed) samples.

A *sample* is one prompt with one seed; teacher and student draw it from the same starting
noise. On the toy, the prompts are the held-out captions (never seen in training) and the
toy checker judges every attribute of every image; on other bases there is no checker, and
only the student's similarity to the teacher (PSNR, SSIM per image) is scored.

Scores are kept per sample (:class:`Scores`), so any two sets scored on one sample list
compare paired; summaries are means with 95% intervals from a cluster bootstrap over
prompts (:mod:`workbench.stats`).

How many samples? The default, all 81 held-out toy captions x 8 seeds = 648, gives a
full-prompt accuracy near 0.9 an interval of about +/-0.023 if a prompt's errors are no
more likely than another's (binomial: 1.96 x sqrt(0.9 x 0.1 / 648)). Errors that cluster on
some prompts widen it: +/-0.03 still holds while the prompt effect is at most ~8% of the
score variance; beyond that only more prompts help, and the toy has no more held-out ones.
The interval printed is the measured one, whatever the case.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import workbench.evaluation.images as imagestore
from workbench import quality
from workbench.errors import WorkbenchError
from workbench.evaluation.prompts import pick
from workbench.evaluation.suite import Metrics, set_metrics, student_scores, teacher_scores
from workbench.progress import Progress, report
from workbench.stats import Bootstrap, Estimate
from workbench.toy import checker, world

TOY_SEEDS = 8
GENERIC_SEEDS = 2
STEPS = 20
GUIDANCE = 5.0  # SDXL usage; callers pass the base's own (models.Base.guidance)
# Bases without a checker: similarity only, so any varied prompts will do.
GENERIC_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a lighthouse on a cliff at sunset",
    "a watercolor painting of a small village",
    "a close-up portrait of a cat",
    "a bowl of fruit on a kitchen counter, morning light",
    "an astronaut riding a horse on the moon",
    "a city street in the rain at night, neon signs",
    "a pencil sketch of an old oak tree",
)
ACCURACIES = ("colour", "shape", "background", "position", "size", "full", "fidelity")
SIMILARITIES = ("psnr", "ssim")
PERCEPTUAL = ("lpips",)  # student vs teacher too, with a learned backbone (``--metrics lpips``)
PER_SAMPLE = ("clip", "pickscore")  # prompt-image scores, of the teacher and a student alike
SETS = ("fid", "kid")  # distances between image sets: no per-sample scores
ORDER = (*ACCURACIES, *PER_SAMPLE, *SETS, *SIMILARITIES, *PERCEPTUAL)
LABELS = {
    "colour": "colour",
    "shape": "shape",
    "background": "background",
    "position": "position",
    "size": "size",
    "full": "full prompt",
    "fidelity": "fidelity (colour+shape)",
    "psnr": "PSNR dB",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "clip": "CLIP score",
    "pickscore": "PickScore",
    "fid": "FID",
    "kid": "KID",
}


@dataclass(frozen=True)
class Sample:
    """One image to draw: ``group`` is its prompt's index (its seeds are resampled together)."""

    prompt: str
    seed: int
    group: int


def sample_seed(prompt: str, index: int) -> int:
    """The seed of a prompt's ``index``-th sample.

    Every sample gets its own starting noise (no two prompts share seed 0), so seeds are
    nested in prompts as the bootstrap assumes; and a sample's seed depends only on its
    prompt and index, so a subset of prompts draws exactly the samples the full set did.
    """
    digest = hashlib.sha256(f"{prompt}\n{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def toy_prompts(n: int | None = None) -> list[str]:
    """Held-out toy captions, spread evenly over the held-out list (all by default)."""
    return pick([s.caption for s in world.held_out_scenes()], n, "held-out toy captions")


def samples(prompts: Sequence[str], seeds: int) -> list[Sample]:
    if seeds < 1:
        raise WorkbenchError(f"--seeds must be a positive integer, got {seeds}")
    return [Sample(p, sample_seed(p, j), g) for g, p in enumerate(prompts) for j in range(seeds)]


def default_samples(is_toy: bool, n_prompts: int | None, seeds: int | None) -> list[Sample]:
    """The evaluation samples of a base: held-out captions on the toy, generic prompts elsewhere."""
    if is_toy:
        return samples(toy_prompts(n_prompts), seeds or TOY_SEEDS)
    return samples(pick(list(GENERIC_PROMPTS), n_prompts, "generic prompts"), seeds or GENERIC_SEEDS)


@dataclass
class Scores:
    """Per-sample scores of one UNet on a sample list (0/1 accuracies, real similarities).

    ``seen`` (toy) is what the checker read from each image, for reports and re-checks.
    """

    samples: list[Sample]
    values: dict[str, np.ndarray]
    seen: list[dict[str, str | None]] | None = None
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # FID/KID: one figure for the set

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample."""
        out = []
        for i, s in enumerate(self.samples):
            row: dict[str, Any] = {"prompt": s.prompt, "seed": s.seed}
            row |= {k: _plain(v[i]) for k, v in self.values.items()}
            if self.seen is not None:
                row["seen"] = self.seen[i]
            out.append(row)
        return out

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], samples_: list[Sample]) -> Scores:
        """Scores written by :meth:`rows`, checked against the samples they must belong to."""
        got = [(r["prompt"], r["seed"]) for r in rows]
        if got != [(s.prompt, s.seed) for s in samples_]:
            raise WorkbenchError("saved per-sample scores are for other samples (prompts or seeds differ)")
        keys = [k for k in rows[0] if k not in ("prompt", "seed", "seen")] if rows else []
        values = {k: np.array([float(r[k]) for r in rows]) for k in keys}
        seen = [r["seen"] for r in rows] if rows and "seen" in rows[0] else None
        return cls(list(samples_), values, seen)


def _plain(x: Any) -> Any:
    x = x.item() if hasattr(x, "item") else x
    return int(x) if isinstance(x, float) and x in (0.0, 1.0) else x


def judge(images, samples_: Sequence[Sample]) -> tuple[dict[str, np.ndarray], list[dict[str, str | None]]]:
    """The toy checker's per-sample verdicts: 1.0 where an attribute (or the whole prompt,
    or colour and shape: fidelity) is right, else 0.0; and what it saw."""
    judgements = checker.judge_all(list(images), [s.prompt for s in samples_])
    for j, s in zip(judgements, samples_):
        if set(j.wanted) != set(checker.ATTRIBUTES):
            raise WorkbenchError(f"toy evaluation prompts must name all five attributes: {s.prompt!r}")
    values = {a: np.array([float(j.right(a)) for j in judgements]) for a in checker.ATTRIBUTES}
    values["full"] = np.array([float(j.full_ok) for j in judgements])
    values["fidelity"] = np.array([float(j.ok) for j in judgements])
    return values, [dict(j.seen) for j in judgements]


def similarity(student_images, teacher_images) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of student images against same-sample teacher images."""
    if len(student_images) != len(teacher_images) or not student_images:
        raise WorkbenchError("need the same, non-zero number of student and teacher images")
    a, b = quality.to_tensor(student_images), quality.to_tensor(teacher_images)
    return {"psnr": quality.psnr(a, b).numpy(), "ssim": quality.ssim(a, b).numpy()}


@dataclass(frozen=True)
class Sampler:
    """How a student draws its images: scheduler (``sampling.SCHEDULERS``), steps, guidance."""

    steps: int
    guidance: float
    scheduler: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "steps": self.steps, "guidance": self.guidance}


@dataclass
class Evaluator:
    """A teacher pipeline and a fixed sample list; the teacher's images are drawn once.

    ``student(unet)`` draws and scores any UNet that fits the pipeline on the same
    samples; ``summary`` and ``versus`` turn scores into intervals, all from one set of
    bootstrap resamples (so comparisons are paired). ``metrics`` adds the field's metrics
    (``workbench.evaluation.suite``); ``teacher_key`` names the teacher's images in the
    image cache (``workbench.evaluation.images``) so a later evaluation reuses them; ``out``
    keeps every image drawn (``out/teacher/0000.png``, ``out/student/...``); ``progress``
    hears of every batch.
    """

    pipe: Any
    samples: list[Sample]
    checker: bool
    steps: int = STEPS
    guidance: float = GUIDANCE
    batch_size: int = 16
    metrics: Metrics = field(default_factory=Metrics)
    teacher_key: dict[str, Any] | None = None
    out: Path | None = None
    progress: Progress | None = None
    bootstrap: Bootstrap = field(init=False)
    _teacher_images: list | None = field(default=None, init=False, repr=False)
    _teacher: Scores | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise WorkbenchError("an evaluation needs at least one sample")
        self.bootstrap = Bootstrap([s.group for s in self.samples])

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "guidance": self.guidance,
            "prompts": len({s.group for s in self.samples}),
            "seeds": len(self.samples) // len({s.group for s in self.samples}),
            "samples": len(self.samples),
        }

    def draw(self, unet=None, sampler: Sampler | None = None, who: str = "teacher") -> list:
        """The samples' images: the teacher's (``unet`` None) or a student's, with the
        evaluation's steps and guidance unless ``sampler`` says otherwise."""
        from workbench.sampling import generate  # heavy (diffusers' pipelines, transformers): only to draw

        sampler = sampler or Sampler(steps=self.steps, guidance=self.guidance)
        prompts, seeds, images = [s.prompt for s in self.samples], [s.seed for s in self.samples], []
        for start in range(0, len(prompts), self.batch_size):
            report(self.progress, start / len(prompts), f"{who}: drawing images {start}/{len(prompts)}")
            stop = start + self.batch_size
            images += generate(
                self.pipe, prompts[start:stop], seeds[start:stop], steps=sampler.steps, guidance=sampler.guidance,
                unet=unet, batch_size=self.batch_size, scheduler=sampler.scheduler,
            )  # fmt: skip
        report(self.progress, 1.0, f"{who}: drew {len(images)} images")
        return images

    def teacher_images(self) -> list:
        if self._teacher_images is None:
            found = imagestore.cached(self.teacher_key) if self.teacher_key else None
            if found is not None:
                report(self.progress, 1.0, f"teacher: {len(found)} images from the cache")
            else:
                found = self.draw()
                if self.teacher_key:
                    imagestore.remember(self.teacher_key, found)
            self._teacher_images = found
            self._keep("teacher", found)
        return self._teacher_images

    def _keep(self, who: str, images: list) -> None:
        if self.out is not None:
            imagestore.save(Path(self.out) / who, images)

    def teacher(self) -> Scores:
        """The teacher's own scores: checker verdicts (toy) and the chosen metrics that need
        no teacher to compare with (CLIP score, PickScore; FID/KID against a reference folder)."""
        if self._teacher is None:
            images = self.teacher_images()
            values, seen = judge(images, self.samples) if self.checker else ({}, None)
            values |= teacher_scores(self.metrics, images, self._prompts(), self.progress)
            sets = set_metrics(self.metrics, images, None, self.bootstrap, "teacher", self.progress)
            self._teacher = Scores(self.samples, values, seen, sets)
        return self._teacher

    def _prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]

    def student(self, unet, sampler: Sampler | None = None) -> Scores:
        """A student UNet's scores: checker verdicts (toy), PSNR/SSIM against the teacher and the
        chosen metrics. ``sampler`` draws it its own way (e.g. 4 LCM steps against the teacher's 20)."""
        teacher_images = self.teacher_images()
        images = self.draw(unet, sampler, who="student")
        self._keep("student", images)
        values, seen = judge(images, self.samples) if self.checker else ({}, None)
        values |= similarity(images, teacher_images)
        values |= student_scores(self.metrics, images, teacher_images, self._prompts(), self.progress)
        sets = set_metrics(self.metrics, images, teacher_images, self.bootstrap, "student", self.progress)
        return Scores(self.samples, values, seen, sets)

    def summary(self, scores: Scores) -> dict[str, Estimate]:
        """Mean and interval of every per-sample score, in a fixed order."""
        order = [k for k in ORDER if k in scores.values]
        return {k: self.bootstrap.mean(scores.values[k], k) for k in order}

    def versus(self, scores: Scores, reference: Scores) -> dict[str, Estimate]:
        """Paired ratios ``scores / reference`` of full-prompt accuracy, fidelity and the
        prompt-image scores."""
        out = {}
        for k in ("full", "fidelity", *PER_SAMPLE):
            if k in scores.values and k in reference.values and reference.values[k].mean() > 0:
                out[k] = self.bootstrap.ratio(scores.values[k], reference.values[k])
        return out

    def difference(self, scores: Scores, reference: Scores) -> dict[str, Estimate]:
        """Paired differences ``scores - reference`` of every score both have."""
        shared = [k for k in ORDER if k in scores.values and k in reference.values]
        return {k: self.bootstrap.difference(scores.values[k], reference.values[k]) for k in shared}


def summarise(evaluator: Evaluator, scores: Scores) -> dict[str, dict[str, Any]]:
    """Every score's mean and interval (per-sample ones by the bootstrap, FID/KID as computed)."""
    out: dict[str, dict[str, Any]] = as_dicts(evaluator.summary(scores))
    out |= scores.sets
    return {k: out[k] for k in ORDER if k in out}


def as_dicts(estimates: dict[str, Estimate]) -> dict[str, dict[str, float | int]]:
    return {k: v.to_dict() for k, v in estimates.items()}


# --------------------------------------------------------------------------- results and records

RECORD_SCHEMA = 2  # 2 added "protocol" (how each metric was computed) and "images" (where they are)
_RECORD_KEYS = {
    "schema_version", "base", "unet", "settings", "interval", "teacher", "student",
    "student_vs_teacher", "weights", "software", "protocol", "images", "per_sample",
}  # fmt: skip
_V1_KEYS = _RECORD_KEYS - {"protocol", "images"}


def weights_digest(folder: str | Path | None) -> str | None:
    """SHA-256 over a UNet folder's weight files (names and bytes); ``None`` if there are none."""
    if folder is None:
        return None
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _software() -> dict[str, Any]:
    import diffusers
    import torch

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
    }


def result(evaluator: Evaluator, base, teacher: Scores, student: Scores | None, unet: str | None,
           sampler: Sampler | None = None) -> dict:  # fmt: skip
    """Everything one evaluation found, JSON-ready; ``per_sample`` holds every sample's scores.

    This is also the format of a model's recorded evaluation (``evaluation.json`` beside
    the toy teacher): ``read_record`` loads it strictly.
    """
    teacher_unet = Path(base.location) / "unet" if base.kind in ("toy", "pipeline") else None
    rows = [{"prompt": s.prompt, "seed": s.seed} for s in evaluator.samples]
    for row, t in zip(rows, teacher.rows()):
        row["teacher"] = {k: v for k, v in t.items() if k not in ("prompt", "seed")}
    if student is not None:
        for row, s in zip(rows, student.rows()):
            row["student"] = {k: v for k, v in s.items() if k not in ("prompt", "seed")}
    return {
        "schema_version": RECORD_SCHEMA,
        "base": base.name,
        "unet": str(unet) if unet else None,
        "settings": evaluator.settings | ({"student_sampler": sampler.to_dict()} if sampler else {}),
        "interval": evaluator.bootstrap.describe(),
        "teacher": summarise(evaluator, teacher),
        "student": summarise(evaluator, student) if student is not None else None,
        "student_vs_teacher": as_dicts(evaluator.versus(student, teacher)) if student is not None else None,
        "weights": {"teacher": weights_digest(teacher_unet), "student": weights_digest(unet)},
        "software": _software(),
        "protocol": evaluator.metrics.protocol(),
        "images": {"teacher": "teacher", "student": "student" if student is not None else None}
        if evaluator.out is not None
        else None,  # folders beside the record
        "per_sample": rows,
    }


def write_record(path: str | Path, data: dict[str, Any]) -> None:
    """Write a result atomically as readable JSON with one line per sample."""
    import json
    import os

    head = json.dumps({k: v for k, v in data.items() if k != "per_sample"}, indent=2)
    rows = ",\n".join("    " + json.dumps(r, separators=(", ", ": ")) for r in data["per_sample"])
    text = head[: head.rindex("}")].rstrip() + ',\n  "per_sample": [\n' + rows + "\n  ]\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_record(path: str | Path) -> dict[str, Any]:
    """A saved evaluation (``evaluate --save``), checked strictly: schema, keys, samples."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WorkbenchError(f"cannot read the evaluation record {str(path)!r}: {err}") from None
    if not isinstance(data, dict) or data.get("schema_version") not in (1, RECORD_SCHEMA):
        raise WorkbenchError(f"{str(path)!r} is not an evaluation record of schema 1 or {RECORD_SCHEMA}")
    if data["schema_version"] == 1 and set(data) == _V1_KEYS:  # recorded before FID/CLIP: none of them
        data = data | {"schema_version": RECORD_SCHEMA, "protocol": {}, "images": None}
    if set(data) != _RECORD_KEYS:
        missing, unknown = _RECORD_KEYS - set(data), set(data) - _RECORD_KEYS
        raise WorkbenchError(
            f"evaluation record {str(path)!r}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
        )
    if len(data["per_sample"]) != data["settings"]["samples"]:
        raise WorkbenchError(
            f"evaluation record {str(path)!r} lists {len(data['per_sample'])} samples but its settings say "
            f"{data['settings']['samples']}"
        )
    return data


def record_samples(data: dict[str, Any]) -> list[Sample]:
    """The samples of a record, grouped by prompt as they were evaluated."""
    groups: dict[str, int] = {}
    return [
        Sample(r["prompt"], r["seed"], groups.setdefault(r["prompt"], len(groups)))
        for r in data["per_sample"]
    ]


def record_scores(data: dict[str, Any], who: str = "teacher") -> Scores:
    """``who``'s (``teacher`` or ``student``) per-sample scores from a record."""
    rows = [{"prompt": r["prompt"], "seed": r["seed"], **r[who]} for r in data["per_sample"]]
    return Scores.from_rows(rows, record_samples(data))


# --------------------------------------------------------------------------- text


def format_result(result: dict[str, Any]) -> list[str]:
    """Lines of a human-readable table of a result (``per_sample`` not needed)."""
    s, iv = result["settings"], result["interval"]
    lines = [
        f"{result['base']}: {s['samples']} samples ({s['prompts']} prompts x {s['seeds']} seeds), "
        f"{s['steps']} steps, guidance {s['guidance']:g}; mean [{iv['level']:.0%} interval, {iv['method']}]"
    ]
    if s.get("student_sampler"):
        o = s["student_sampler"]
        lines.append(f"  student: {o['steps']} {o['scheduler']} steps, guidance {o['guidance']:g}")
    student, ratio = result["student"] or {}, result["student_vs_teacher"] or {}
    head = f"  {'':<24} {'teacher':<22}"
    if result["student"] is not None:
        head += f" {'student':<22} student / teacher"
    lines.append(head)
    for key in ORDER:
        if key not in result["teacher"] and key not in student:
            continue
        cells = [_cell(result["teacher"].get(key))]
        if result["student"] is not None:
            cells += [_cell(student.get(key)), _cell(ratio.get(key))]
        lines.append(f"  {LABELS[key]:<24} " + " ".join(f"{c:<22}" for c in cells).rstrip())
    lines += [f"  {LABELS.get(k, k)}: {text}" for k, text in (result.get("protocol") or {}).items()]
    return lines


def _cell(est: dict[str, Any] | None) -> str:
    if est is None:
        return "-"
    e = Estimate.from_dict(est)
    return e.format(2 if abs(e.mean) >= 10 else 3 if abs(e.mean) >= 0.01 or e.mean == 0 else 5)


__all__ = [
    "TOY_SEEDS",
    "GENERIC_SEEDS",
    "STEPS",
    "GUIDANCE",
    "GENERIC_PROMPTS",
    "ACCURACIES",
    "SIMILARITIES",
    "PERCEPTUAL",
    "PER_SAMPLE",
    "SETS",
    "ORDER",
    "LABELS",
    "Sample",
    "sample_seed",
    "toy_prompts",
    "samples",
    "default_samples",
    "Scores",
    "judge",
    "similarity",
    "Sampler",
    "Evaluator",
    "summarise",
    "as_dicts",
    "RECORD_SCHEMA",
    "weights_digest",
    "result",
    "write_record",
    "read_record",
    "record_samples",
    "record_scores",
    "format_result",
    "Metrics",
    "Estimate",
    "Bootstrap",
]
