"""Precomputed teacher targets (``--teacher-targets precompute``): the same losses as a live
teacher, an exact resume, and a clear error when a file is gone."""

import os
from pathlib import Path

import pytest
import torch

from workbench import losses, targets
from workbench.distill import run_distillation
from workbench.errors import WorkbenchError
from workbench.runs import RunDir, read_metrics
from workbench.testing import run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


def _config(base, **changes):
    """Two micro-batches a step (two target files) and a checkpoint every step."""
    return run_config(base, **({"grad_accum": 2, "checkpoint_every": 1} | changes))


def _rows(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")[0]


def test_precomputed_targets_give_the_live_runs_losses(base, tmp_path, capsys):
    run_distillation(_config(base), tmp_path / "live")
    status = run_distillation(_config(base, teacher_targets="precompute"), tmp_path / "pre")
    assert status["state"] == "done"
    live, pre = _rows(tmp_path / "live"), _rows(tmp_path / "pre")
    assert [r["step"] for r in pre] == [0, 1, 2, 3]
    for a, b in zip(live, pre):  # every term: output KD and each feature pair read from disk
        assert set(a) == set(b) and sum(k.startswith("loss/feat/") for k in b) == 26
        for key in a:
            if key.startswith("loss/"):
                assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
    out = capsys.readouterr().out
    assert "teacher targets precomputed (8 files" in out  # 4 steps x 2 micro-batches
    assert not (tmp_path / "pre" / "targets").exists()  # spent once the run is done


def test_a_precomputed_run_resumes_exactly(base, tmp_path):
    config = _config(base, teacher_targets="precompute", presets=("segmind-vega",))
    run_distillation(config, tmp_path / "straight")
    reference = {r["step"]: r["loss/total"] for r in _rows(tmp_path / "straight")}
    os.environ["WORKBENCH_FAULT_STEP"] = "2"
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            run_distillation(config, tmp_path / "split")
    finally:
        del os.environ["WORKBENCH_FAULT_STEP"]
    folder = RunDir(tmp_path / "split").targets(0) / "rank_0"
    (folder / "step_0000003_1.safetensors").unlink()  # lost with the crash: computed again
    assert run_distillation(None, tmp_path / "split", resume=True)["state"] == "done"
    resumed = {r["step"]: r["loss/total"] for r in _rows(tmp_path / "split")}
    assert sorted(resumed) == sorted(reference) == [0, 1, 2, 3]
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, abs=1e-6), step


@pytest.mark.slow
def test_a_finished_stages_targets_leave_the_disk(base, tmp_path):
    """Each stage's precomputed targets are deleted once its student is saved, not kept until
    the whole run ends (disk would grow with every stage)."""
    config = _config(
        base, teacher_targets="precompute", presets=("ssd-1b", "segmind-vega"), steps=2, grad_accum=1
    )
    os.environ["WORKBENCH_FAULT_STEP"] = "2"  # stage 2's first step: its targets are on disk
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            run_distillation(config, tmp_path / "run")
    finally:
        del os.environ["WORKBENCH_FAULT_STEP"]
    run = RunDir(tmp_path / "run")
    assert not run.targets(0).exists() and list((run.targets(1) / "rank_0").glob("*.safetensors"))
    assert run_distillation(None, tmp_path / "run", resume=True)["state"] == "done"


def test_the_store_round_trips_and_names_a_missing_step(tmp_path):
    store = targets.TargetStore(tmp_path / "rank_0")
    base = torch.randn(2, 8, 4, 4)
    features = {"down_blocks.1.attentions.0": base[:, :4], "mid_block": base.to(torch.bfloat16)}
    written = store.write(5, 1, losses.TeacherTargets(torch.randn(2, 4, 8, 8), features))
    back = store.read(5, 1)
    assert written == 2 * 4 * 8 * 8 * 4 + 2 * 4 * 4 * 4 * 4 + 2 * 8 * 4 * 4 * 2  # views saved as their own
    assert torch.equal(back.features["down_blocks.1.attentions.0"], base[:, :4])
    assert back.features["mid_block"].dtype == torch.bfloat16 and back.pred.shape == (2, 4, 8, 8)
    with pytest.raises(
        WorkbenchError, match=r"targets of step 7 \(micro-batch 1\) are missing from .*; resume"
    ):
        store.read(6, 0)
    no_pred = losses.TeacherTargets(None, {"mid_block": base})
    store.write(6, 0, no_pred)
    assert store.read(6, 0).pred is None


def test_teacher_targets_is_checked(base, tmp_path):
    with pytest.raises(WorkbenchError, match="teacher_targets|teacher-targets"):
        run_distillation(_config(base, teacher_targets="disk"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
