"""``distill --report-to tensorboard``: a tiny run writes a TensorBoard event file with its
losses (read back with TensorBoard's own reader) and its sample grid; metrics.jsonl stays."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from workbench.cli import main
from workbench.distill_config import DistillConfig, validate
from workbench.errors import ConfigError
from workbench.presets import load_preset
from workbench.runs import read_metrics
from workbench.trackers import FOLDER, Trackers, check

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_tiny_run_reports_to_tensorboard(perturbed_pipeline, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--base", perturbed_pipeline, "--preset", "ssd-1b", "--steps", "3", "--run-dir", str(run),
            "--toy-samples", "8", "--batch-size", "2", "--sample-steps", "2", "--device", "cpu",
            "--report-to", "tensorboard"]  # fmt: skip
    assert main(args) == 0
    rows, _ = read_metrics(run / "metrics.jsonl")
    logdir = run / FOLDER / run.name  # accelerate's TensorBoardTracker: logging_dir/run_name
    assert list(logdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0}).Reload()
    total = acc.Scalars("loss/total")
    assert [e.step for e in total] == [r["step"] for r in rows]
    assert [e.value for e in total] == pytest.approx([r["loss/total"] for r in rows], rel=1e-6)
    assert "lr" in acc.Tags()["scalars"] and "samples" in acc.Tags()["images"]


def test_no_tracker_by_default_and_unknown_ones_are_refused(tmp_path):
    assert DistillConfig.defaults()["report_to"] == "none"
    off = Trackers("none", tmp_path)
    off.log({"loss/total": 1.0}, 0)
    off.close()
    assert not (tmp_path / FOLDER).exists()
    with pytest.raises(ConfigError, match="choose from none, tensorboard, wandb, trackio"):
        check("mlflow")
    with pytest.raises(ConfigError, match="unknown --report-to .comet.; choose one of none, tensorboard"):
        validate(DistillConfig(stages=(load_preset("ssd-1b").to_dict(),), steps=1, report_to="comet"))
