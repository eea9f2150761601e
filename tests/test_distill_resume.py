"""Resuming with flags: more steps continue a run (even a finished one) exactly, and are
recorded; any other changed option is refused by name. Progressive runs resume inside a
later stage exactly."""

import json
import os
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.distill import run_distillation
from workbench.runs import RunDir, read_metrics
from workbench.testing import run_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


def _losses(run_dir):
    rows, _ = read_metrics(Path(run_dir) / "metrics.jsonl")
    return {r["step"]: r["loss/total"] for r in rows}, rows


def test_more_steps_on_resume_continue_a_finished_run_exactly(base, tmp_path, capsys):
    run_distillation(run_config(base, steps=6), tmp_path / "straight")
    reference, _ = _losses(tmp_path / "straight")
    run_dir = tmp_path / "prolonged"
    assert run_distillation(run_config(base, steps=3), run_dir)["state"] == "done"
    capsys.readouterr()
    assert main(["distill", "--run-dir", str(run_dir), "--resume", "--steps", "6", "--lr", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "resumed with --steps 6 (was 3)" in out and "run done at step 6" in out
    losses, rows = _losses(run_dir)
    assert sorted(losses) == list(range(6)) and len(rows) == 6  # every step exactly once
    for step, value in reference.items():  # constant lr: the same as one 6-step run
        assert losses[step] == pytest.approx(value, abs=1e-6), step
    job = RunDir(run_dir).read_job()
    assert job["config"]["steps"] == 6
    assert [r["changed"] for r in job["resumed"]] == [[{"field": "steps", "was": 3, "now": 6}]]
    assert RunDir(run_dir).read_status()["total_steps"] == 6
    assert (run_dir / "samples" / "step_0000006.png").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "2e-4"], "error: --lr cannot change on resume (was 0.0001, given 0.0002); start a new run"),
        (["--preset", "koala-700m"], "error: --stages cannot change on resume (was ssd-1b, given koala-700m)"),
        (["--steps", "1"], "error: --steps can only grow on resume (was 2, given 1)"),
        (["--feature-mode", "block"], "error: --feature-mode cannot change on resume (was layer, given block)"),
    ],
)  # fmt: skip
def test_other_changes_on_resume_are_refused_by_name(base, tmp_path, capsys, flags, message):
    run_dir = tmp_path / "run"
    RunDir(run_dir).request_stop()
    assert run_distillation(run_config(base, steps=2), run_dir)["state"] == "stopped"
    before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["distill", "--run-dir", str(run_dir), "--resume", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing trained
    assert RunDir(run_dir).read_job()["config"]["steps"] == 2 and "resumed" not in RunDir(run_dir).read_job()


def test_progressive_run_resumes_inside_a_later_stage(base, tmp_path):
    stages = ("ssd-1b", "segmind-vega")
    config = run_config(base, steps=2, presets=stages, checkpoint_every=1, stage_teacher="previous",
                        lr_schedule="cosine", warmup_steps=2)  # fmt: skip
    run_distillation(config, tmp_path / "straight")
    reference, _ = _losses(tmp_path / "straight")
    os.environ["WORKBENCH_FAULT_STEP"] = "3"  # stage 2's second step, after its first checkpoint
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            run_distillation(config, tmp_path / "split")
    finally:
        del os.environ["WORKBENCH_FAULT_STEP"]
    info = json.loads((tmp_path / "split" / "checkpoints" / "step_0000003" / "checkpoint.json").read_text())
    assert info["stage"] == 1  # the resume starts inside stage 2, from its own checkpoint
    assert run_distillation(None, tmp_path / "split", resume=True)["state"] == "done"
    resumed, _ = _losses(tmp_path / "split")
    assert sorted(resumed) == sorted(reference) == [0, 1, 2, 3]
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, abs=1e-6), step
