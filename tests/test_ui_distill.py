"""Distill tab handlers, called as plain functions on a tiny real pipeline."""

import html
import json
import os
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from workbench.distill_config import DistillConfig
from workbench.errors import WorkbenchError
from workbench.runs import RunDir
from workbench.ui import distill_tab as dt
from workbench.ui.settings import AppSettings, Limits
from workbench.ui.store import Store

FORM = {"steps": 3, "toy_samples": 16, "batch_size": 2, "lr": 1e-4, "w_task": 1.0, "w_out": 0.5, "w_feat": 0.5,
        "feature_mode": "layer", "mixed_precision": "no", "stage_teacher": "original",
        "sample_every": 0, "checkpoint_every": 2, "data": "toy"}  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


def test_loss_figure_downsamples_and_lists_terms():
    rows = [{"step": i, "loss/total": 1.0 / (i + 1), "loss/task": 0.5, "loss/feat/down_blocks.1.resnets.0": 0.1}
            for i in range(5000)]  # fmt: skip
    fig = dt.loss_figure(rows, per_layer=False)
    assert [t["name"] for t in fig["data"]] == ["total", "task"]
    assert len(fig["data"][0]["x"]) <= dt.MAX_POINTS + 1 and fig["data"][0]["x"][-1] == 4999
    names = [t["name"] for t in dt.loss_figure(rows, per_layer=True)["data"]]
    assert "feat/down_blocks.1.resnets.0" in names


def test_loss_figure_shows_the_lcd_terms_and_a_negative_total():
    """An LCD stage logs loss/lcd (and, reward-guided, loss/reward, with a total that can go
    below zero): all are drawn, and the y axis is linear when a value would be lost on a log one."""
    rows = [
        {"step": i, "loss/total": 0.02 - 0.01 * i, "loss/lcd": 0.02, "loss/reward": float(i)}
        for i in range(4)
    ]
    fig = dt.loss_figure(rows, per_layer=False)
    assert [t["name"] for t in fig["data"]] == ["total", "lcd", "reward"]
    assert fig["layout"]["yaxis"]["type"] == "linear"
    assert dt.loss_figure(rows[1:2], per_layer=False)["layout"]["yaxis"]["type"] == "log"


def test_metrics_polling_follows_a_resume_that_regrows_the_file(tmp_path):
    """A resume rewrites metrics.jsonl (rows after the checkpoint dropped) and appends again;
    a poll after it has grown past the old offset must not read from that offset."""
    from workbench.runs import MetricsWriter

    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    first = MetricsWriter(run)
    for step in range(3):
        first.write({"step": step, "loss/total": 1.0})
    first.close()
    assert [r["step"] for r in dt.metrics_rows(str(run.root))] == [0, 1, 2]
    again = MetricsWriter(run, truncate_after_step=0)  # resumed from the checkpoint after step 0
    for step in (1, 2, 3):
        again.write({"step": step, "loss/total": 0.123456789, "loss/task": 0.5})  # longer rows
    again.close()
    assert [r["step"] for r in dt.metrics_rows(str(run.root))] == [0, 1, 2, 3]


def test_status_of_a_dead_run_says_failed(tmp_path):
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    run.job.write_text(json.dumps({"config": {"steps": 10}}))
    run.write_status(state="running", step=3, pid=2**22 + 12345)  # no such process
    md = dt.status_md(str(run.root))
    assert "failed" in md and "step 3 / 10" in md and "resume" in md.lower()


@pytest.mark.parametrize(
    "changes, removed, message",
    [({}, [], "current plan removes nothing"), ({"steps": 0}, ["mid_block"], "steps must be > 0"),
     ({"data": "/no/such/folder"}, ["mid_block"], "does not exist"),
     ({"feature_mode": "x"}, ["mid_block"], "unknown feature mode")],
)  # fmt: skip
def test_bad_launches_are_explained(base, tmp_path, changes, removed, message):
    with pytest.raises(WorkbenchError, match=message):
        dt.launch(Store(), base, dt.CURRENT_PLAN, removed, FORM | changes, "", "", Limits(), root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_sensitivity_options_reach_the_run(base, tmp_path):
    config = dt.run_config(base, None, FORM | {"feature_weights": "sensitivity", "freeze_sensitive": 2.0}, "ssd-1b")
    assert config.feature_weights == "sensitivity" and config.freeze_sensitive == 2
    plain = dt.run_config(base, None, FORM, "ssd-1b")  # forms without them: today's defaults
    assert plain.feature_weights == "uniform" and plain.freeze_sensitive == 0
    with pytest.raises(WorkbenchError, match="--freeze-sensitive 99: stage 1's student"):
        dt.launch(
            Store(), base, "ssd-1b", [], FORM | {"freeze_sensitive": 99}, "", "", Limits(), root=tmp_path
        )
    assert not any(tmp_path.iterdir())
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    run.write_status(state="running", step=0, pid=None, message="measuring sensitivity 40%: deviation 3/90")
    assert "measuring sensitivity 40%" in dt.status_md(str(run.root))


def test_launch_watch_and_download(base, tmp_path):
    store = Store()
    run_dir = dt.launch(store, base, "koala-700m", [], FORM, "", "first", Limits(), root=tmp_path)
    with pytest.raises(WorkbenchError, match="still"):
        dt.launch(store, base, "koala-700m", [], FORM, "", "second", Limits(), root=tmp_path)
    deadline = time.time() + 600
    while RunDir(run_dir).read_status().get("state") not in ("done", "failed") and time.time() < deadline:
        time.sleep(1)
    assert RunDir(run_dir).read_status()["state"] == "done", RunDir(run_dir).log.read_text()[-3000:]
    job = RunDir(run_dir).read_job()  # started from the config the app validated, not a command line
    assert job["command"].endswith(f"distill --from-job --run-dir {run_dir}"), job["command"]
    assert DistillConfig.from_dict(job["config"]) == dt.run_config(base, None, FORM, "koala-700m")
    rows = dt.metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert dt.latest_sample(run_dir).endswith(".png")
    assert dt.run_choices(tmp_path)[0][1] == run_dir
    names = zipfile.ZipFile(dt.student_zip(run_dir)).namelist()
    assert {"config.json", "plan.json", "layer_map.json", "README.md"} <= set(names)
    with pytest.raises(WorkbenchError, match="has finished"):
        dt._resume(run_dir)
    with pytest.raises(WorkbenchError, match="max|at most"):
        dt.launch(
            store, base, "koala-700m", [], FORM | {"steps": 500}, "", "big", Limits.for_space(), root=tmp_path
        )


@pytest.mark.parametrize(
    "key, value, says",
    [("steps", None, "Steps is missing; give a whole number > 0"),
     ("steps", 2.5, "Steps must be a whole number > 0, got 2.5"),
     ("steps", 0, "Steps must be > 0, got 0"),
     ("batch_size", -3, "Batch size must be > 0, got -3"),
     ("lr", None, "Learning rate is missing"),
     ("w_feat", -1.0, "λ feature KD must be >= 0, got -1.0"),
     ("checkpoint_every", 0.0, "Checkpoint every must be > 0, got 0"),
     ("freeze_sensitive", 0.5, "Freeze most sensitive must be a whole number >= 0"),
     ("data", "", "Data is missing")],
)  # fmt: skip
def test_bad_form_values_name_their_box_and_launch_nothing(base, tmp_path, key, value, says):
    form = dt.FORM_DEFAULTS | FORM | {key: value}
    values = tuple(form[k] for k in dt.FORM_KEYS)
    view = {"base": base}
    message, picker = dt.launch_or_explain(
        Store(), view, [], "koala-700m", "", "", values, Limits(), tmp_path
    )
    text = html.unescape(message)
    assert "Not launched" in text and says in text and "--" not in text, text
    assert picker == gr.skip()
    assert not any(tmp_path.iterdir())


def test_whole_numbers_from_number_boxes_reach_the_run_as_integers(base):
    config = dt.run_config(base, None, FORM | {"steps": 3.0, "batch_size": 2.0}, "ssd-1b")
    assert (config.steps, config.batch_size) == (3, 2) and isinstance(config.steps, int)


def _run(root, name, **status):
    run = RunDir(root / name)
    run.root.mkdir()
    run.write_status(**status)
    return run


def test_the_run_list_follows_live_states_and_a_reload_selects_the_running_run(tmp_path):
    _run(tmp_path, "old", state="done", step=3, pid=None)
    live = _run(tmp_path, "live", state="running", step=8, pid=os.getpid())  # a process that is alive
    picker, shown = dt.picker_on_open(tmp_path)
    assert picker["value"] == str(live.root)
    assert ("live (running, step 8)", str(live.root)) in shown
    assert dt.picker_refresh(shown, tmp_path) == (gr.skip(), gr.skip())  # nothing changed: left alone
    live.write_status(state="stopped", step=8)
    picker, shown = dt.picker_refresh(shown, tmp_path)
    assert ("live (stopped, step 8)", str(live.root)) in picker["choices"] == shown
    assert dt.picker_on_open(tmp_path)[0]["value"] is None  # nothing in progress: nothing selected


def test_a_small_sample_grid_is_shown_enlarged_under_its_own_caption(tmp_path):
    from PIL import Image

    run = _run(tmp_path, "r", state="running", step=3, pid=None)
    caption, image = dt.sample_view(str(run.root))
    assert "none yet" in caption and image is None
    run.samples.mkdir(parents=True)
    Image.new("RGB", (256, 128)).save(run.samples / "step_0000003.png")  # the toy: 4 images of 64 px, 2 rows
    caption, image = dt.sample_view(str(run.root))
    assert "step 3" in caption and "teacher (top row)" in caption and "2× enlarged" in caption
    assert image.size == (512, 256)


def test_the_memory_estimate_of_the_form_before_launch(base):
    view = {"base": base}
    form = dt.FORM_DEFAULTS | FORM
    md = dt.estimate_or_explain(Store(), view, [], "koala-700m", "", tuple(form[k] for k in dt.FORM_KEYS))
    assert "Peak GPU memory" in md and "nothing loaded" in md
    assert all(c in md for c in ("teacher", "weights", "gradients", "optimizer", "activations", "encoders"))
    assert all(f"| {gb} GB | fits |" in md for gb in (16, 24, 40, 48, 80))  # a tiny model fits anywhere
    bad = tuple((form | {"batch_size": 0})[k] for k in dt.FORM_KEYS)
    said = html.unescape(dt.estimate_or_explain(Store(), view, [], "koala-700m", "", bad))
    assert "No estimate" in said and "Batch size must be > 0" in said
    result, hints = dt.memory_estimate(Store(), base, "koala-700m", [], form, "")
    assert hints == []  # nothing to fit
    hint = {"gpu_gb": 16, "fits": True, "options": ["teacher in bf16"], "flags": "--teacher-dtype bf16",
            "total_gb": 0.5}  # fmt: skip
    assert "| 16 GB | fits | teacher in bf16 (peak 0.50 GiB" in dt.memory_md(result, [hint])


# --------------------------------------------------------------------------- the LCD stage

LCD_FORM = {"lcd_guidance_min": 1.5, "lcd_guidance_max": None, "lcd_ema": 0.9, "lcd_loss": "l2",
            "lcd_huber_c": 0.01, "lcd_sample_steps": 2.0, "lcd_lora_rank": 0.0}  # fmt: skip


def _values(**changes) -> tuple:
    form = dt.FORM_DEFAULTS | FORM | LCD_FORM | changes
    return tuple(form[k] for k in dt.FORM_KEYS)


def test_lcd_boxes_start_at_the_runs_defaults():
    from workbench.distill_config import DistillConfig

    with gr.Blocks():
        form = dt._form(AppSettings())
    defaults = DistillConfig.defaults()
    for key in dt.LCD_KEYS:
        box = form.fields[key]
        assert (
            box.value == (defaults[key] if defaults[key] is not None else "") and box.label == dt.LABELS[key]
        ), key
    assert isinstance(form.fields["lcd_loss"], gr.Dropdown)
    # Gradio's number box shows and sends None as 0: an optional number is a text box, empty
    assert (
        isinstance(form.fields["lcd_guidance_min"], gr.Textbox)
        and form.fields["lcd_guidance_min"].value == ""
    )
    assert isinstance(form.fields["lcd_ema"], gr.Number)
    assert form.lcd.value is False


@pytest.mark.parametrize(
    ("stages", "plan_first"), [("", True), ("koala-700m", False), ("koala-700m, lcd", False)]
)
def test_an_lcd_launch_reaches_the_run_with_the_forms_config(base, tmp_path, monkeypatch, stages, plan_first):
    """What Launch starts (the job.json the run reads with --from-job) is the config the page
    checked: plans, objectives and every LCD option, typed."""
    from workbench.distill_config import launched_config
    from workbench.presets import load_preset

    started = {}

    def start_run(root, name, argv, files=None):
        started.update(argv=argv, files=files or {})
        return RunDir(Path(root) / name)

    monkeypatch.setattr(dt.jobs, "start_run", start_run)
    plan = load_preset("koala-700m")
    form = dict(zip(dt.FORM_KEYS, _values()))
    config = dt.run_config(base, plan if plan_first else None, form, stages, lcd=True)
    assert config.objectives == ("kd", "lcd") and config.stages[0] == config.stages[1] == plan.to_dict()
    assert (config.lcd_guidance_min, config.lcd_guidance_max, config.lcd_ema) == (1.5, None, 0.9)
    assert (
        config.lcd_sample_steps == 2 and isinstance(config.lcd_sample_steps, int) and config.lcd_loss == "l2"
    )
    message, _ = dt.launch_or_explain(
        Store(), {"base": base}, [], "koala-700m", stages, "lcd-run", _values(), Limits(), tmp_path, lcd=True
    )
    assert "started lcd-run" in message, message
    assert started["argv"] == ["--from-job"]  # no command line: the run reads the config itself
    for name, text in started["files"].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert launched_config(tmp_path) == config


@pytest.mark.parametrize(
    "changes, says",
    [({"lcd_guidance_min": 5.0, "lcd_guidance_max": 2.0},
      "The guidance range runs backwards: LCD guidance min 5 > LCD guidance max 2"),
     ({"lcd_guidance_min": 0.5}, "LCD guidance min must be >= 1 (1: no guidance), got 0.5"),
     ({"lcd_ema": 1.0}, "LCD EMA decay must be in [0, 1), got 1.0"),
     ({"lcd_ema": None}, "LCD EMA decay is missing"),
     ({"lcd_huber_c": 0.0}, "LCD Huber c must be > 0, got 0.0"),
     ({"lcd_sample_steps": 2.5}, "LCM sample steps must be a whole number of LCM steps from 1 to 8, got 2.5"),
     ({"lcd_sample_steps": 9}, "LCM sample steps must be a whole number of LCM steps from 1 to 8, got 9"),
     ({"lcd_lora_rank": -1}, "LCM-LoRA rank must be a whole number >= 0"),
     ({"lcd_loss": "l1"}, "Unknown LCD loss 'l1'")],
)  # fmt: skip
def test_bad_lcd_values_name_their_box_and_launch_nothing(base, tmp_path, changes, says):
    message, picker = dt.launch_or_explain(
        Store(), {"base": base}, [], "koala-700m", "", "", _values(**changes), Limits(), tmp_path, lcd=True
    )
    text = html.unescape(message)
    assert "Not launched" in text and says in text and "--" not in text, text
    assert picker == gr.skip() and not any(tmp_path.iterdir())


def test_lcd_options_without_an_lcd_stage(base, tmp_path):
    message, _ = dt.launch_or_explain(
        Store(), {"base": base}, [], "koala-700m", "", "", _values(lcd_lora_rank=4), Limits(), tmp_path
    )
    assert "LCM-LoRA rank" in html.unescape(message) and not any(tmp_path.iterdir())
    assert dt.stage_names("a, lcd", lcd=True) == ["a", "lcd"] and dt.stage_names("", lcd=True) == ["lcd"]


def test_a_number_too_large_for_a_float_is_named_not_missing(base, tmp_path):
    """1e400 in a number box reaches the server as None (the page holds Infinity, JSON sends
    null): the message says it may be that. An optional number's text box reads it as inf."""
    for key, value, says in (("steps", None, "Steps is missing; give a whole number > 0 (the box is empty, or holds "
                              "a number too large to read, like 1e400)"),
                             ("lcd_guidance_max", "1e400", "LCD guidance max is not a finite number (got inf: too large)"),
                             ("lcd_guidance_min", "two", "LCD guidance min must be a number >= 1 (1: no guidance), got 'two'")):  # fmt: skip
        message, _ = dt.launch_or_explain(Store(), {"base": base}, [], "koala-700m", "", "", _values(**{key: value}),
                                          Limits(), tmp_path, lcd=True)  # fmt: skip
        assert says in html.unescape(message), message
    assert dt.form_fields({"lcd_guidance_min": " 2.5 ", "lcd_guidance_max": ""})["lcd_guidance_min"] == 2.5
    assert dt.form_fields({"lcd_guidance_max": ""})["lcd_guidance_max"] is None


def test_a_launched_job_is_read_strictly(tmp_path):
    from workbench.distill_config import launched_config

    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    run.job.write_text(json.dumps({"config": {"stages": [], "steps": 1, "colour": "red"}}))
    with pytest.raises(WorkbenchError, match="unknown keys"):
        launched_config(run.root)
    run.job.write_text(json.dumps({"config": {"stages": []}}))
    with pytest.raises(WorkbenchError, match="does not describe a run"):
        launched_config(run.root)
    run.job.write_text(json.dumps({"config": {}, "base": {}}))  # a started run's job.json
    with pytest.raises(WorkbenchError, match="holds no launched job"):
        launched_config(run.root)
