import json
import shutil
import subprocess
import sys

import pytest
from diffusers import UNet2DConditionModel

from workbench.cli import main
from workbench.models import TOY_DIR
from workbench.presets import load_preset


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_teacher):
    path = tmp_path_factory.mktemp("teacher")
    tiny_teacher.save_pretrained(path)
    return path


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_units_json(capsys, sdxl_config):
    data = _json(capsys, ["units", "--base", "sdxl-base", "--json"])
    assert data["total_params"] == 2_567_463_684
    assert sum(1 for u in data["units"] if u["kind"] == "layer") == 15
    assert set(data["units"][0]) == {"id", "stage", "kind", "params", "parent"}


def test_plan_json_keys(capsys):
    data = _json(
        capsys, ["plan", "--base", "sdxl-base", "--preset", "segmind-vega", "--resolution", "512", "--json"]
    )
    assert {
        "teacher_params",
        "student_params",
        "teacher_flops",
        "student_flops",
        "student_config",
        "removed",
    } <= set(data)
    assert data["student_params"] == 745_225_604
    assert data["teacher_flops"] / data["student_flops"] == pytest.approx(2.40, abs=0.01)


def test_export_writes_a_stock_diffusers_folder(capsys, teacher_dir, tmp_path):
    out = tmp_path / "student"
    data = _json(
        capsys, ["export", "--base", str(teacher_dir), "--preset", "koala-700m", "--out", str(out), "--json"]
    )
    unet, info = UNet2DConditionModel.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values())
    assert sum(p.numel() for p in unet.parameters()) == data["student_params"]
    assert unet.mid_block is None
    assert json.loads((out / "layer_map.json").read_text())["student_to_teacher"]
    assert load_preset(str(out / "plan.json")).name == "koala-700m"


def _bad_plan(tmp_path, **changes):
    data = load_preset("ssd-1b").to_dict() | changes
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, t: ["plan", "--base", "sdxl-base", "--preset", str(_write(t, "{oops"))], "not valid JSON"),
        (lambda d, t: ["plan", "--base", "sdxl-base", "--preset", _bad_plan(t, schema_version=2)], "schema_version 2"),
        (lambda d, t: ["plan", "--base", "sdxl-base", "--preset", _bad_plan(t, removed=["mid_blocks"])], "unknown units"),
        (lambda d, t: ["plan", "--base", "sd15-base", "--preset", "ssd-1b"], "another UNet topology"),
        (lambda d, t: ["plan", "--base", "sdxl-base", "--preset", _bad_plan(t, removed=["down_blocks.1.layers.0"])],
         "remove down_blocks.1.layers.1 instead"),
        (lambda d, t: ["export", "--base", str(t / "missing"), "--preset", "ssd-1b", "--out", str(t / "o")], "not a built-in"),
        (lambda d, t: ["export", "--base", "sdxl-base", "--preset", "ssd-1b", "--out", str(t / "o")], "without weights"),
        (lambda d, t: ["export", "--base", str(d), "--preset", _bad_plan(t, removed=["up_blocks.0.layers.0"]),
                       "--out", str(t / "o")], "mirrored down stage"),
        (lambda d, t: ["plan", "--base", "sdxl-base", "--preset", "ssd-1b", "--resolution", "500"], "multiple of 32"),
        (lambda d, t: ["export", "--base", _weightless(d, t), "--preset", "ssd-1b", "--out", str(t / "o")],
         "could not load the UNet"),
    ],
)  # fmt: skip
def test_bad_inputs_one_line_error_nothing_written(make, message, teacher_dir, tmp_path, capsys):
    assert main(make(teacher_dir, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def _weightless(teacher_dir, tmp_path):
    """A UNet folder whose weights went missing (an interrupted copy)."""
    folder = tmp_path / "weightless"
    folder.mkdir()
    (folder / "config.json").write_text((teacher_dir / "config.json").read_text())
    return str(folder)


def _write(folder, text):
    path = folder / "x.json"
    path.write_text(text)
    return path


def test_cli_process_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "workbench", "units", "--base", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "is not a built-in name" in proc.stderr


def test_plan_refuses_a_resolution_of_zero(capsys):
    assert main(["plan", "--base", "sdxl-base", "--preset", "ssd-1b", "--resolution", "0"]) == 2
    assert "resolution 0 px is not valid for this UNet" in capsys.readouterr().err


def test_help_says_every_default(capsys):
    import argparse

    from workbench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            default = action.default
            if default in (None, argparse.SUPPRESS) or isinstance(default, bool) or not action.option_strings:
                continue
            said = "default" in (action.help or "") or f"(default: {default})" in text
            assert said, (name, action.option_strings)
    with pytest.raises(SystemExit):
        main(["distill", "--help"])  # its flags default to None (resume), the help to the run's own
    out = " ".join(capsys.readouterr().out.split())
    assert "batch per process (default: 8)" in out and "checkpoint every N steps (default: 100)" in out


def test_help_states_each_default_once_and_never_none():
    import argparse

    from workbench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help in (None, argparse.SUPPRESS):
                continue
            shown = formatter._expand_help(action)  # the help text as --help prints it
            assert "(default: None)" not in shown, (name, action.option_strings, shown)
            assert shown.count("(default:") <= 1, (name, action.option_strings, shown)


def test_distill_into_an_existing_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a run")
    argv = ["distill", "--preset", "ssd-1b", "--steps", "1", "--run-dir", str(tmp_path / "taken")]
    assert main(argv) == 2
    assert "is a file, not a folder; choose a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ out-of-range numbers, damaged folders

HUGE = str(2**64)


def _one_line_error(capsys, argv) -> str:
    """Run ``argv``; it must end in exit code 2 and one error line on stderr (after diffusers'
    loading bar, if a pipeline began to load), never a traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert code == 2 and last.startswith("error: ") and err.count("error: ") == 1, (code, err)
    assert "Traceback" not in err
    return last


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--base", "sdxl-base", "--preset", "ssd-1b", "--resolution", HUGE],
        ["sample", "--prompt", "x", "--out", "x.png", "--seed", HUGE],
        ["sample", "--prompt", "x", "--out", "x.png", "--seed", "-" + HUGE],
        ["latency", "--base", "sdxl-base", "--preset", "ssd-1b", "--batch", HUGE],
        ["memory", "--base", "sdxl-base", "--preset", "ssd-1b", "--lora-rank", HUGE],
        ["distill", "--preset", "ssd-1b", "--resolution", HUGE],
        ["evaluate", "--steps", HUGE],
    ],
)
def test_a_number_beyond_what_torch_holds_is_one_line(capsys, argv):
    err = _one_line_error(capsys, argv)
    assert "out of range: give -2147483647 to 2147483647" in err and argv[-2] in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--base", "sdxl-base", "--preset", "ssd-1b"], "resolution 2147483616 px is too large"),
        (
            ["autoprune", "--target-flops", "0.5", "--method", "static"],
            "resolution 2147483616 px is too large",
        ),
        (["memory", "--base", "sdxl-base", "--preset", "ssd-1b"], "resolution 2147483616 px is too large"),
        (["latency", "--base", "sdxl-base", "--preset", "ssd-1b"], "resolution 2147483616 px is too large"),
    ],
)
def test_a_resolution_torch_cannot_size_is_one_line(capsys, argv, message):
    assert message in _one_line_error(capsys, [*argv, "--resolution", "2147483616"])


def test_steps_beyond_the_schedule_are_one_line(capsys, tmp_path):
    argv = ["sample", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--steps", "2147483616"]
    assert "at most 1000 denoising steps" in _one_line_error(capsys, argv)
    argv = [
        "distill",
        "--preset",
        "ssd-1b",
        "--steps",
        "1",
        "--sample-steps",
        "5000",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    assert "--sample-steps must be from 1 to 1000, got 5000" in _one_line_error(
        capsys, argv
    )  # before training


def _damaged(source, folder, **writes):
    shutil.copytree(source, folder)
    for name, data in writes.items():
        path = folder / name.replace("__", "/")
        if data is None:
            path.unlink()
        elif isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return str(folder)


@pytest.mark.parametrize(
    "writes, message",
    [
        ({"config.json": ""}, "cannot read"),
        ({"config.json": "[]"}, "holds a JSON list, not the object"),
        (
            {"config.json": '{"_class_name": "UNet2DConditionModel"}'},
            "'down_block_types' must be a non-empty list",
        ),
    ],
)
def test_a_damaged_unet_config_is_one_line(capsys, tmp_path, teacher_dir, writes, message):
    folder = _damaged(teacher_dir, tmp_path / "unet", **writes)
    assert message in _one_line_error(capsys, ["units", "--base", folder])


@pytest.mark.parametrize(
    "writes, message",
    [
        ({"model_index.json": "[]"}, "model_index.json holds a JSON list"),
        ({"unet__config.json": "{}"}, "'down_block_types' must be a non-empty list"),
        ({"vae__config.json": "[]"}, "vae/config.json holds a JSON list"),
    ],
)
def test_a_damaged_pipeline_config_is_one_line(capsys, tmp_path, writes, message):
    folder = _damaged(TOY_DIR, tmp_path / "pipe", **writes)
    assert message in _one_line_error(capsys, ["plan", "--base", folder, "--preset", "ssd-1b"])


def test_truncated_or_missing_weights_are_one_line(capsys, tmp_path, teacher_dir):
    weights = "diffusion_pytorch_model.safetensors"
    cut = (teacher_dir / weights).read_bytes()[:1000]
    latency = ["latency", "--preset", "ssd-1b", "--resolution", "64", "--repeats", "1", "--dtype", "fp32"]
    for name, writes in (("cut", {weights: cut}), ("gone", {weights: None})):
        folder = _damaged(teacher_dir, tmp_path / name, **writes)
        err = _one_line_error(capsys, [*latency, "--base", folder])
        assert f"could not load the UNet of {folder!r}" in err and "complete diffusers save" in err
    text_encoder = _damaged(TOY_DIR, tmp_path / "pipe", **{"text_encoder__model.safetensors": b"xx"})
    argv = [
        "sample",
        "--base",
        text_encoder,
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "x.png"),
        "--steps",
        "1",
    ]
    assert "could not load the pipeline of" in _one_line_error(capsys, argv)


def test_a_truncated_student_is_one_line(capsys, tmp_path):
    student = _damaged(TOY_DIR / "unet", tmp_path / "student")
    path = tmp_path / "student" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    argv = ["sample", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--steps", "1", "--unet", student]
    assert f"could not load the UNet in {student!r}" in _one_line_error(capsys, argv)
