"""One fast-dtype rule and one table of dtype names, used by the CLI, the app and the benchmarks."""

import importlib.util
import re

import pytest
import torch

from workbench import dtypes, latency, stage
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.testing import ROOT
from workbench.ui.blocks_tab import default_dtype


def test_cpu_is_fp32_with_a_reason():
    choice = dtypes.fast_dtype("cpu")
    assert choice.name == "fp32"
    assert "bf16" in choice.reason
    assert choice.describe().startswith("dtype fp32: ")


def test_cuda_is_bf16_where_supported_else_fp16():
    choice = dtypes.fast_dtype("cuda")
    if not torch.cuda.is_available():
        assert choice.name == "fp16" and "not available" in choice.reason
    else:
        assert choice.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        assert torch.cuda.get_device_name(0) in choice.reason


def test_the_table_and_its_errors():
    assert dtypes.torch_dtypes() == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert set(dtypes.NAMES) == set(dtypes.torch_dtypes())
    with pytest.raises(WorkbenchError, match=r"unknown dtype 'fp8'; choose one of fp32, bf16, fp16"):
        dtypes.torch_dtype("fp8")


def test_every_user_of_a_dtype_table_shares_the_one_table():
    assert stage.TEACHER_DTYPES is dtypes.torch_dtypes()
    assert latency.check_dtype("bf16", "cpu") is torch.bfloat16
    # No second name -> torch dtype table anywhere in the code (the one lives in workbench/dtypes.py).
    table = re.compile(r"""["'](bf16|fp16|fp32)["']\s*:\s*torch\.""")
    sources = [*(ROOT / "workbench").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    found = [
        str(p.relative_to(ROOT)) for p in sources if p.name != "dtypes.py" and table.search(p.read_text())
    ]
    assert found == []


def test_every_front_end_defaults_to_the_rule():
    assert default_dtype("cpu") == "fp32"  # the app's Dtype box
    assert latency.latency_setup("sdxl-base", "cpu").dtype == "fp32"  # library default (CLI, benchmarks)


def test_latency_help_names_the_rule_not_bf16(capsys):
    with pytest.raises(SystemExit):
        main(["latency", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default bf16" not in out and "the device's fast dtype, fp32 on cpu" in out


def test_latency_command_says_which_dtype_and_why(capsys):
    argv = ["latency", "--base", "toy", "--preset", "ssd-1b", "--resolution", "64", "--repeats", "1"]
    assert main([*argv, "--warmup", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"{dtypes.fast_dtype('cpu').describe()}\n" in captured.err
    assert '"dtype": "fp32"' in captured.out
    assert main([*argv, "--warmup", "0", "--dtype", "bf16", "--json"]) == 0  # asked for: no note
    captured = capsys.readouterr()
    assert "dtype fp32" not in captured.err and '"dtype": "bf16"' in captured.out


def test_speedup_benchmark_defaults_to_the_rule():
    spec = importlib.util.spec_from_file_location("speedup_benchmark", ROOT / "benchmarks" / "speedup.py")
    speedup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speedup)
    assert speedup.parse_args([]).dtype is None  # latency_setup then takes each device's fast dtype
    assert speedup.parse_args(["--dtype", "bf16"]).dtype == "bf16"
