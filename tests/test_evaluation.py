"""Per-sample evaluation on a base without a checker (a tiny SDXL pipeline), and the
pieces that need no model: samples, per-sample rows, records, text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench import evaluation as ev
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.models import load_pipeline, load_unet
from workbench.presets import load_preset
from workbench.surgery import build_student

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seeds_are_per_sample_and_prompts_spread_over_the_list():
    assert ev.sample_seed("a red circle", 0) == ev.sample_seed("a red circle", 0)
    assert ev.sample_seed("a red circle", 0) != ev.sample_seed("a red circle", 1)
    assert ev.sample_seed("a red circle", 0) != ev.sample_seed("a blue circle", 0)
    generic = ev.default_samples(False, 4, 3)
    assert [s.prompt for s in generic[::3]] == [ev.GENERIC_PROMPTS[i] for i in (0, 2, 4, 6)]
    assert [s.group for s in generic] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(WorkbenchError, match=f"between 1 and {len(ev.GENERIC_PROMPTS)}"):
        ev.default_samples(False, len(ev.GENERIC_PROMPTS) + 1, 1)
    with pytest.raises(WorkbenchError, match="positive integer"):
        ev.samples(["a red circle"], 0)


def test_per_sample_rows_round_trip_and_must_match_their_samples():
    samples = ev.samples(["p", "q"], 2)
    scores = ev.Scores(
        samples, {"full": np.array([1.0, 0.0, 1.0, 1.0]), "psnr": np.array([30.5, 31, 29, 100])}
    )
    rows = json.loads(json.dumps(scores.rows()))
    assert rows[0] == {"prompt": "p", "seed": samples[0].seed, "full": 1, "psnr": 30.5}
    again = ev.Scores.from_rows(rows, samples)
    assert {k: v.tolist() for k, v in again.values.items()} == {
        k: v.tolist() for k, v in scores.values.items()
    }
    with pytest.raises(WorkbenchError, match="other samples"):
        ev.Scores.from_rows(rows, ev.samples(["p", "q"], 1))


@pytest.fixture(scope="module")
def pipe(perturbed_pipeline):
    return load_pipeline(perturbed_pipeline)


def test_a_student_is_scored_on_the_teachers_samples(pipe, perturbed_pipeline):
    e = ev.Evaluator(pipe, ev.default_samples(False, 2, 2), checker=False, steps=2)
    assert e.teacher().values == {}  # no checker: nothing to judge the teacher on
    same = e.student(pipe.unet)
    assert same.values["psnr"].tolist() == [100.0] * 4
    student, _ = build_student(load_unet(perturbed_pipeline), load_preset("segmind-vega"))
    other = e.student(student)
    assert (other.values["psnr"] < 100).all() and (other.values["ssim"] < 1).all()
    summary = e.summary(other)
    assert list(summary) == ["psnr", "ssim"]
    assert summary["psnr"].low <= summary["psnr"].mean <= summary["psnr"].high
    diff = e.difference(other, same)["psnr"]
    assert diff.mean == pytest.approx(other.values["psnr"].mean() - 100) and diff.high < 0


def test_cli_evaluate_on_a_base_without_checker(perturbed_pipeline, tmp_path, capsys):
    save = tmp_path / "r.json"
    args = ["evaluate", "--base", perturbed_pipeline, "--unet", f"{perturbed_pipeline}/unet", "--prompts", "2",
            "--seeds", "1", "--steps", "2"]  # fmt: skip
    assert main([*args, "--json", "--save", str(save)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["teacher"] == {} and list(result["student"]) == ["psnr", "ssim"]
    assert result["student_vs_teacher"] == {}
    assert result["settings"]["samples"] == 2 and result["interval"]["prompts"] == 2
    record = ev.read_record(save)
    assert [r["seed"] for r in record["per_sample"]] == [s.seed for s in ev.default_samples(False, 2, 1)]
    assert record["per_sample"][0]["student"] == {"psnr": 100.0, "ssim": pytest.approx(1.0)}
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 samples (2 prompts x 1 seeds)" in text and "PSNR dB" in text and "full prompt" not in text


def test_records_are_read_strictly(tmp_path):
    path = tmp_path / "r.json"
    good = {k: None for k in ev._RECORD_KEYS} | {
        "schema_version": ev.RECORD_SCHEMA, "settings": {"samples": 0}, "per_sample": [],
    }  # fmt: skip
    ev.write_record(path, good)
    assert ev.read_record(path) == good
    ev.write_record(path, good | {"extra": 1})
    with pytest.raises(WorkbenchError, match=r"unknown keys \['extra'\]"):
        ev.read_record(path)
    ev.write_record(path, good | {"schema_version": 99})
    with pytest.raises(WorkbenchError, match="not an evaluation record"):
        ev.read_record(path)
    ev.write_record(path, good | {"settings": {"samples": 3}})
    with pytest.raises(WorkbenchError, match="lists 0 samples"):
        ev.read_record(path)
    path.write_text("{")
    with pytest.raises(WorkbenchError, match="cannot read"):
        ev.read_record(path)
