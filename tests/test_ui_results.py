"""The Results panel's handlers as plain functions, and the panel built in a Blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from workbench import evaluation as ev
from workbench.models import TOY_DIR
from workbench.ui import plan_view, results_tab
from workbench.ui.settings import AppSettings
from workbench.ui.shared import Shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def root(tmp_path) -> Path:
    run = tmp_path / "runs" / "toy-run"
    shutil.copytree(TOY_DIR / "unet", run / "student")
    (run / "job.json").write_text(json.dumps({"base": {"name": "toy", "location": "toy"}}))
    (run / "status.json").write_text(json.dumps({"state": "done", "step": 2}))
    (run / "metrics.jsonl").write_text('{"step": 0, "loss/total": 2.0}\n{"step": 1, "loss/total": 1.5}\n')
    return tmp_path / "runs"


def test_evaluate_fills_the_table_and_csvs_download(root):
    [(label, run_dir)] = results_tab.run_choices(root, with_student=True)
    assert label == "toy-run (done)"
    seen = []
    text = results_tab.evaluate_run(run_dir, "toy", ["psnr", "ssim", "fid"], 2, 1, "", space=False,
                                    progress=lambda f, desc=None: seen.append(desc))  # fmt: skip
    assert "FID" in text and "Kept in the run folder: `evaluation/`" in text
    assert any("teacher" in (d or "") for d in seen) and any("student" in (d or "") for d in seen)
    frame = results_tab.load_table(root, list(results_tab.KINDS), "")
    assert list(frame["kind"]) == ["teacher", "run"] and frame.loc[1, "psnr"] == 100.0
    record = ev.read_record(root / "toy-run" / "evaluation" / "evaluation.json")
    assert frame.loc[1, "fid"] == record["student"]["fid"]["mean"]
    assert "path" not in results_tab.shown(frame).columns
    assert results_tab.load_table(root, ["run"], "nothing-like-this").empty
    assert results_tab.load_table(root, None, None).equals(frame)  # boxes of a tab not yet drawn send None
    assert list(results_tab.load_table(root, list(results_tab.KINDS), "TOY-")["name"]) == ["toy-run"]
    back = pd.read_csv(results_tab.csv_file(frame, "results.csv"))
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)


def test_space_mode_keeps_to_metrics_without_paths(root):
    run_dir = results_tab.run_choices(root)[0][1]
    text = results_tab.evaluate_run(run_dir, "toy", ["clip", "psnr"], 1, 1, "/etc", space=True)
    assert "CLIP" not in text and "PSNR" in text


def test_the_panel_builds(root, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS_DIR", str(root))
    with gr.Blocks() as demo:
        ctx = Shared(settings=AppSettings(), store=None, demo=demo, view=gr.State(plan_view.new_view("toy", 64)),
                     plan=gr.State([]), model_status=gr.Markdown())  # fmt: skip
        results_tab.build(ctx)
    assert any(getattr(b, "elem_id", None) == "wb-results-table" for b in demo.blocks.values())
