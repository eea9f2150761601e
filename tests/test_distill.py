"""Short real distillation runs on a tiny SDXL pipeline (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from workbench.distill import run_distillation
from workbench.errors import WorkbenchError
from workbench.presets import load_preset
from workbench.runs import RunDir, read_metrics
from workbench.testing import FAST_ARGV, run_config


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.mark.slow
def test_a_bf16_teacher_run_draws_its_sample_grids(base, tmp_path):
    """--teacher-dtype bf16 (the cheapest memory-lean option) on the pipeline's own UNet: the
    teacher is a cast copy, so the fp32 pipeline still draws the grids (it failed at the final
    grid: 'expected m1 and m2 to have the same dtype')."""
    from workbench.models import as_teacher

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    teacher = as_teacher(unet, "cpu", torch.bfloat16)
    assert teacher.dtype == torch.bfloat16 and unet.dtype == torch.float32
    assert as_teacher(unet, "cpu", torch.float32) is unet
    w = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(teacher.state_dict()[w], unet.state_dict()[w].to(torch.bfloat16))
    status = run_distillation(run_config(base, steps=1, teacher_dtype="bf16"), tmp_path / "run")
    assert status["state"] == "done" and list(RunDir(tmp_path / "run").samples.glob("step_*.png"))


def _losses(run_dir):
    rows, _ = read_metrics(Path(run_dir) / "metrics.jsonl")
    return {r["step"]: r["loss/total"] for r in rows}, rows


def _cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "workbench", "distill", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {}),
    )  # fmt: skip


def test_run_writes_metrics_samples_and_a_stock_student(base, tmp_path):
    status = run_distillation(run_config(base), tmp_path / "run")
    assert status["state"] == "done" and status["step"] == 4
    losses, rows = _losses(tmp_path / "run")
    assert sorted(losses) == [0, 1, 2, 3]
    keys = set(rows[0])
    assert {"step", "time", "lr", "loss/total", "loss/task", "loss/out", "loss/feat"} <= keys
    assert sum(k.startswith("loss/feat/") for k in keys) == 26  # SSD-1B's layer-level terms
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    run = RunDir(tmp_path / "run")
    assert list(run.samples.glob("step_*.png"))
    job = run.read_job()
    assert job["stages"][0]["plan"] == "ssd-1b" and job["config"]["steps"] == 4
    # the exported student: stock diffusers, in a stock SDXL pipeline with the teacher's parts
    unet, info = UNet2DConditionModel.from_pretrained(run.student, output_loading_info=True)
    assert all(not v for v in info.values())
    pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    card = (run.student / "README.md").read_text()
    assert card.startswith("---") and "distillation" in card.split("---")[1] and "4 optimizer steps" in card
    for path in run.student.iterdir():  # no local path (config.json's _name_or_path too); readable
        assert str(tmp_path) not in path.read_text(errors="replace") or path.suffix == ".safetensors"
        assert path.stat().st_mode & 0o044 == 0o044
    assert json.loads((run.student / "plan.json").read_text())["name"] == "ssd-1b"


def test_stop_then_resume_matches_an_uninterrupted_run(base, tmp_path):
    run_distillation(run_config(base), tmp_path / "straight")
    reference, _ = _losses(tmp_path / "straight")
    RunDir(tmp_path / "split").request_stop()  # honoured after the first step
    status = run_distillation(run_config(base), tmp_path / "split")
    assert status["state"] == "stopped" and status["step"] == 1
    assert not RunDir(tmp_path / "split").student.exists()
    status = run_distillation(None, tmp_path / "split", resume=True)
    assert status["state"] == "done"
    resumed, _ = _losses(tmp_path / "split")
    assert sorted(resumed) == sorted(reference)
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, abs=1e-6), step


def test_progressive_stages(base, tmp_path):
    config = run_config(
        base, steps=2, presets=("ssd-1b", "segmind-vega"), stage_teacher="previous", feature_mode="block"
    )
    status = run_distillation(config, tmp_path / "prog")
    assert status["state"] == "done" and status["step"] == 4
    _, rows = _losses(tmp_path / "prog")
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    student = UNet2DConditionModel.from_pretrained(tmp_path / "prog" / "student")
    assert student.config.transformer_layers_per_block == [1, 1, 2]  # Vega's depths
    bad = run_config(base, steps=2, presets=("segmind-vega", "ssd-1b"))
    with pytest.raises(WorkbenchError, match="which the earlier stage 'segmind-vega' removed"):
        run_distillation(bad, tmp_path / "bad")


def test_kill9_then_resume_loses_nothing(base, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _cli("--base", base, "--preset", "ssd-1b", "--steps", "10", "--run-dir", str(run_dir), *FAST_ARGV)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_0000002").is_dir() and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before, _ = _losses(run_dir)
    assert before and RunDir(run_dir).read_status()["state"] == "running"  # died without a word
    status = run_distillation(None, run_dir, resume=True)
    assert status["state"] == "done" and status["step"] == 10
    after, rows = _losses(run_dir)
    assert sorted(after) == list(range(10)) and len(rows) == 10  # every step exactly once
    for step, value in before.items():  # steps redone after the checkpoint come out the same
        assert after[step] == pytest.approx(value, abs=1e-6)


def test_sigterm_stops_with_a_checkpoint(base, tmp_path):
    run_dir = tmp_path / "term"
    proc = _cli(
        "--base", base, "--preset", "koala-700m", "--steps", "200", "--run-dir", str(run_dir), *FAST_ARGV
    )
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    status = RunDir(run_dir).read_status()
    assert status["state"] == "stopped" and status["step"] < 200
    assert (run_dir / "checkpoints" / f"step_{status['step']:07d}").is_dir()


def test_crash_leaves_failed_status_and_resumes(base, tmp_path):
    run_dir = tmp_path / "crash"
    os.environ["WORKBENCH_FAULT_STEP"] = "3"
    try:
        with pytest.raises(RuntimeError, match="injected fault at step 3"):
            run_distillation(run_config(base, steps=5), run_dir)
    finally:
        del os.environ["WORKBENCH_FAULT_STEP"]
    status = RunDir(run_dir).read_status()
    assert status["state"] == "failed" and "injected fault at step 3" in status["error"]
    assert run_distillation(None, run_dir, resume=True)["state"] == "done"
    assert sorted(_losses(run_dir)[0]) == [0, 1, 2, 3, 4]


def _folder(tmp_path):
    """Three images; all but 0.png have a caption."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 64), (40 * i, 0, 0)).save(folder / f"{i}.png")
        if i:
            (folder / f"{i}.txt").write_text("a red square")
    return str(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"feature_mode": "everything"}, "unknown feature mode 'everything'"),
        ({"data": "/nonexistent/folder"}, "does not exist"),
        ({"w_out": -0.5}, "--w-out must be >= 0"),
        ({"steps": 0}, "--steps must be > 0"),
        ({"stages": ({**load_preset("ssd-1b").to_dict(), "removed": ["down_blocks.1.layers.0"]},)},
         "remove down_blocks.1.layers.1 instead"),
        ({"mixed_precision": "fp16"}, "fp16 needs a CUDA GPU"),
    ],
)  # fmt: skip
def test_bad_configs_rejected_before_training(base, tmp_path, changes, message):
    with pytest.raises(WorkbenchError, match=message):
        run_distillation(run_config(base, **changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_images_without_captions_rejected_and_folder_data_trains(base, tmp_path):
    with pytest.raises(WorkbenchError, match=r"1 image\(s\) .* have no caption: 0.png"):
        run_distillation(run_config(base, data=_folder(tmp_path)), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (Path(tmp_path) / "images" / "0.txt").write_text("a dark square")
    status = run_distillation(run_config(base, steps=1, data=str(tmp_path / "images")), tmp_path / "run")
    assert status["state"] == "done"
    cache = json.loads((tmp_path / "run" / "cache" / "data.json").read_text())
    assert cache["captions"] == ["a dark square", "a red square", "a red square"]


def test_prompt_data_and_sample_grids_follow_the_runs_resolution(base, tmp_path, capsys):
    """--data prompts.txt --resolution 32: the teacher draws the training images at 32 px with
    the given steps and guidance (it drew them at the UNet's native size with 20 steps), says so
    in the log, and the sample grids are 32 px too."""
    from PIL import Image

    from workbench import data
    from workbench.models import load_pipeline

    pipe = load_pipeline(base)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # native: 64 px
    drawn = data.teacher_examples(pipe, ["a red square"], 0, steps=2, guidance=1.5, size=32)
    assert drawn[0].load().size == (32, 32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n", encoding="utf-8")
    config = run_config(base, steps=1, data=str(prompts), resolution=32, teacher_image_steps=3,
                     teacher_image_guidance=1.5, sample_prompts=("a red square",))  # fmt: skip
    assert run_distillation(config, tmp_path / "run")["state"] == "done"
    assert "the teacher draws 2 training images at 32px with 3 steps, guidance 1.5" in capsys.readouterr().out
    fingerprint = json.loads((tmp_path / "run" / "cache" / "data.json").read_text())["fingerprint"]
    assert fingerprint["res"] == 32 and fingerprint["drawn"] == {"steps": 3, "guidance": 1.5}
    grids = sorted(RunDir(tmp_path / "run").samples.glob("step_*.png"))
    assert grids and Image.open(grids[-1]).size == (32, 64)  # one prompt: teacher over student, 32 px each


def test_cli_errors_are_one_line(base, tmp_path):
    proc = _cli("--base", base, "--preset", "ssd-1b", "--steps", "-3", "--run-dir", str(tmp_path / "r"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: --steps must be > 0" in out and "Traceback" not in out


def test_accelerate_launch_two_cpu_processes(base, tmp_path):
    # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` with
    # Accelerator(cpu=True) starts two gloo ranks on a CPU-only machine.
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "workbench", "distill", "--base", base, "--preset", "ssd-1b", "--steps", "2",
           "--run-dir", str(run_dir), "--device", "cpu", *FAST_ARGV]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    status = RunDir(run_dir).read_status()
    assert status["state"] == "done" and status["world_size"] == 2
    losses, _ = _losses(run_dir)
    assert sorted(losses) == [0, 1]  # one row per step, written by rank 0 only
    _, info = UNet2DConditionModel.from_pretrained(run_dir / "student", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys


def test_a_run_can_start_from_a_student_distilled_before(base, tmp_path):
    """``init_student``: stage 1 starts from a trained student's weights, not the teacher's kept ones."""
    run_distillation(run_config(base, steps=2, lr=1e-3), tmp_path / "first")
    first = UNet2DConditionModel.from_pretrained(RunDir(tmp_path / "first").student).state_dict()
    # a near-zero learning rate: the second run's student is (within float noise) where it started
    run_distillation(run_config(base, steps=1, lr=1e-12), tmp_path / "fresh")
    run_distillation(
        run_config(base, steps=1, lr=1e-12, init_student=str(tmp_path / "first")), tmp_path / "again"
    )
    fresh = UNet2DConditionModel.from_pretrained(RunDir(tmp_path / "fresh").student).state_dict()
    again = UNet2DConditionModel.from_pretrained(RunDir(tmp_path / "again").student).state_dict()
    assert max((again[k] - first[k]).abs().max().item() for k in first) < 1e-6
    assert max((fresh[k] - first[k]).abs().max().item() for k in first) > 1e-4  # the teacher's weights differ
    assert RunDir(tmp_path / "again").read_job()["config"]["init_student"] == str(tmp_path / "first")


@pytest.mark.parametrize(
    ("init", "message"),
    [("missing", "holds no student"), ("other-plan", "transformer_layers_per_block=.*segmind-vega")],
)
def test_init_student_of_another_plan_is_refused_before_training(base, tmp_path, init, message):
    folder = tmp_path / "none"
    if init == "other-plan":
        run_distillation(run_config(base, steps=1), tmp_path / "ssd")  # an SSD-1B student
        folder = tmp_path / "ssd"
    with pytest.raises(WorkbenchError, match=message):
        run_distillation(
            run_config(base, presets=("segmind-vega",), init_student=str(folder)), tmp_path / "run"
        )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
