"""The preflight: every check a run makes before loading a model, with errors that carry the
config field they are about (the CLI names its flag, the app its label). No model is loaded."""

import pytest

from workbench.cli import main
from workbench.distill_config import DistillConfig, preflight
from workbench.errors import ConfigError
from workbench.presets import load_preset
from workbench.testing import run_config


def _config(steps=3, **changes):
    """The toy's ssd-1b run of 3 steps, without the fast settings: only ``changes`` differ."""
    return run_config(steps=steps, fast=False, **changes)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 2.5, "steps must be a whole number > 0, got 2.5"),
        ("steps", None, "steps is missing; give a whole number > 0"),
        ("steps", 0, "steps must be > 0, got 0"),
        ("batch_size", 1.5, "batch_size must be a whole number > 0, got 1.5"),
        ("batch_size", None, "batch_size is missing"),
        ("batch_size", 10**12, "batch_size 1000000000000 is too large; at most 2147483647"),
        ("checkpoint_every", 0, "checkpoint_every must be > 0, got 0"),
        ("sample_every", None, "sample_every is missing; give a whole number >= 0 (0: only at the end)"),
        ("freeze_sensitive", 0.5, "freeze_sensitive must be a whole number >= 0 (0: freeze nothing), got 0.5"),
        ("lr", 0, "lr must be > 0, got 0"),
        ("lr", None, "lr is missing; give a number > 0"),
        ("lr", float("nan"), "lr is not a number (got nan); give a number > 0"),
        ("lr", float("inf"), "lr is not a finite number (got inf: too large); give a number > 0"),
        ("steps", float("-inf"), "steps is not a finite number (got -inf: too far below zero); give a whole number > 0"),
        ("w_out", None, "w_out is missing; give a number >= 0"),
        ("w_feat", -1.0, "w_feat must be >= 0, got -1.0"),
        ("uncond_prob", 1.0, "uncond_prob must be in [0, 1), got 1.0"),
        ("steps", True, "steps must be a whole number > 0, got True"),
        ("feature_mode", None, "unknown feature mode None (feature_mode); choose one of layer"),
        ("mixed_precision", "fp8", "unknown mixed_precision 'fp8'; choose one of no, bf16, fp16"),
        ("resolution", 100, "resolution must be a multiple of 32 (px)"),
        ("teacher_image_steps", 0, "teacher_image_steps must be > 0, got 0"),
        ("teacher_image_guidance", -1.0, "teacher_image_guidance must be >= 0, got -1.0"),
        ("data", "", "data is missing"),
    ],
)  # fmt: skip
def test_field_errors_carry_the_field_and_a_neutral_message(field, value, message):
    with pytest.raises(ConfigError) as info:
        preflight(_config(**{field: value}))
    assert info.value.field == field
    assert info.value.message.startswith(message) or message in info.value.message
    assert "--" not in info.value.message  # neutral: no flag names


def test_each_audience_names_the_option_its_own_way():
    with pytest.raises(ConfigError) as info:
        preflight(_config(feature_weights="sensitivity", w_feat=0.0))
    err = info.value
    assert err.field == "feature_weights"
    assert str(err).startswith("--feature-weights sensitivity weights the feature KD terms")
    assert "(--feature-mode none or --w-feat 0)" in str(err)
    labels = {"feature_weights": "feature weights", "feature_mode": "feature loss", "w_feat": "λ feature KD"}
    assert "(feature loss none or λ feature KD 0)" in err.phrased(labels.get)


@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"data": "/no/such/folder"}, "data", "does not exist"),
        ({"base": "sdxl-base"}, "base", "has no pipeline"),
        ({"base": "/no/such/model"}, "base", "is not a built-in name"),
        ({"stages": ({**load_preset("ssd-1b").to_dict(), "removed": ["down_blocks.1.layers.0"]},)},
         "stages", "remove down_blocks.1.layers.1 instead"),
        ({"freeze_sensitive": 99}, "freeze_sensitive", "--freeze-sensitive 99: stage 1.s student"),
    ],
)  # fmt: skip
def test_checks_that_read_files_carry_the_field_too(changes, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        preflight(_config(**changes))
    assert info.value.field == field


def test_a_good_config_passes_and_the_specs_come_back():
    checked = preflight(_config(presets=("ssd-1b", "segmind-vega")))
    assert [s.plan.name for s in checked.specs] == ["ssd-1b", "segmind-vega"]
    assert checked.base.name == "toy"


def test_run_dir_checks(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="--run-dir .* is a file, not a folder") as info:
        preflight(_config(), run_dir=file)
    assert info.value.field == "run_dir"
    with pytest.raises(ConfigError, match="holds no run to resume"):
        preflight(_config(), run_dir=tmp_path / "empty", resume=True)


def test_cli_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    argv = ["distill", "--preset", "ssd-1b", "--steps", "2", "--run-dir", str(file)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run-dir ") and "is a file, not a folder" in err and err.count("\n") == 1


def test_cli_names_flags_and_defaults_come_from_the_config(tmp_path, capsys):
    argv = ["distill", "--preset", "ssd-1b", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2  # no --steps
    assert capsys.readouterr().err == "error: --steps is missing; give a whole number > 0\n"
    assert DistillConfig.defaults()["batch_size"] == 8 and "steps" not in DistillConfig.defaults()


def test_the_teachers_drawing_options_are_flags(tmp_path, capsys):
    argv = ["distill", "--preset", "ssd-1b", "--steps", "1", "--run-dir", str(tmp_path / "r"),
            "--teacher-image-steps", "3", "--teacher-image-guidance", "-1"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: --teacher-image-guidance must be >= 0, got -1.0\n"
    assert _config(teacher_image_guidance=None).image_guidance == 2.0  # the toy's own
    assert _config(teacher_image_guidance=0.0).image_guidance == 0.0
