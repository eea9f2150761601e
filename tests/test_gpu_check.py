"""The GPU acceptance script (benchmarks/gpu_check.py): its dry run (tiny sizes on the CPU,
the same functions as on a GPU) and how it degrades when a row fails."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "rows.json"
    code = gpu_check.main(["--dry-run", "--json-out", str(out)])
    return code, json.loads(out.read_text())


def test_the_dry_run_fills_every_row(dry_run, capsys):
    code, rows = dry_run
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    assert list(by_group) == list(gpu_check.GROUPS)
    # latency: the teacher and every SDXL preset (the SD 1.x ones do not apply to its topology)
    assert [r["check"] for r in by_group["latency"]] == [
        "teacher", "koala-1b", "koala-700m", "sdxl-base", "segmind-vega", "ssd-1b",
    ]  # fmt: skip
    for r in by_group["latency"][1:]:
        assert r["status"] == "OK", r["result"]
        assert r["figures"]["speedup"] > 0 and r["figures"]["flops_ratio"] >= 1.0
    # memory: three recipes, each an estimate beside a measured peak of real steps
    lean = "lean, 8-bit AdamW" if _has_bitsandbytes() else "lean"  # the GPU run always asks for 8-bit
    assert [r["check"] for r in by_group["memory"]] == ["plain", lean, "LoRA rank 4"]
    for r in by_group["memory"]:
        assert r["status"] == "OK", r["result"]
        assert r["figures"]["estimated"] > 0 and r["figures"]["measured"] > 0
        assert all(math.isfinite(x) for x in r["figures"]["losses"])
    few = by_group["few-step"][0]
    assert few["status"] == "OK", few["result"]
    assert 0 < few["figures"]["student_s"] < few["figures"]["teacher_s"]
    assert [r["status"] for r in by_group["toy"]] == ["OK", "OK"], [r["result"] for r in by_group["toy"]]
    assert all(r["status"] == "OK" for r in rows) and code == 0


def test_a_failing_row_is_recorded_and_the_rest_still_run(capsys):
    def boom():
        raise RuntimeError("out of luck\nsecond line")

    def checks(sizes, held):
        return [("first", lambda: ("fine", {"x": 1})), ("second", boom), ("third", lambda: ("also fine", {}))]

    def broken(sizes, held):
        raise ValueError("cannot even list the rows")

    sizes = gpu_check.Sizes("cpu", "toy", 64, "fp32", 1, 0, 4, 2, 1, ("no",), False, 2)
    rows = gpu_check.run_checks(sizes, ("a", "b"), {"a": checks, "b": broken})
    assert [(r.check, r.status) for r in rows] == [
        ("first", "OK"), ("second", "FAILED"), ("third", "OK"), ("(setup)", "FAILED"),
    ]  # fmt: skip
    assert rows[1].result == "RuntimeError: out of luck"  # one line
    assert rows[3].result == "ValueError: cannot even list the rows"
    printed = gpu_check.table(rows)
    assert printed.count("\n") == 1 + len(rows)  # header, rule, one line per row
    assert "| a | second | FAILED | RuntimeError: out of luck |" in printed


def test_without_a_gpu_it_says_to_use_the_dry_run():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])


@pytest.mark.gpu
def test_toy_training_steps_stay_finite_in_bf16_and_fp16_on_cuda():
    """The CUDA-only part of the acceptance that is quick: the recipe under fp16 and bf16 autocast."""
    rows = gpu_check.run_checks(gpu_check.gpu_sizes(), ("toy",))
    assert [r.check for r in rows] == ["mixed precision bf16", "mixed precision fp16"]
    assert all(r.status == "OK" for r in rows), [r.result for r in rows]
