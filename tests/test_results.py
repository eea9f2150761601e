"""The results table: every run and export under a folder with its recorded scores, the
teacher's row, CSV round trips, a run's loss history, and `python -m workbench results`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from workbench import evaluation as ev
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.evaluation import table
from workbench.evaluation.home import card_section, home_of


def _est(mean: float) -> dict:
    return {"mean": mean, "low": mean - 0.5, "high": mean + 0.5, "n": 4}


def _record(base: str, teacher: dict, student: dict) -> dict:
    keys = {k: None for k in ev._RECORD_KEYS}
    return keys | {
        "schema_version": ev.RECORD_SCHEMA, "base": base, "settings": {"samples": 4, "prompts": 2, "seeds": 2},
        "teacher": teacher, "student": student, "protocol": {}, "per_sample": [{}] * 4,
    }  # fmt: skip


def _run(root: Path, name: str, step: int, scores: dict | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"base": {"name": "toy", "location": "toy"}}))
    (run / "status.json").write_text(json.dumps({"state": "done", "step": step}))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss/total": 1 / s}) + "\n" for s in (1, 2))
    )
    if scores is not None:
        ev.write_record(run / "evaluation" / "evaluation.json", _record("toy", {"clip": _est(30.0)}, scores))
    return run


@pytest.fixture()
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    _run(root, "a", 100, {"clip": _est(28.0), "fid": _est(12.5), "psnr": _est(21.0)})
    _run(root, "b", 200, {"clip": _est(25.0), "fid": _est(20.0), "psnr": _est(18.0)})
    _run(root, "c", 50, None)  # not evaluated yet: listed with empty scores
    export = root / "export-a"
    export.mkdir()
    (export / "plan.json").write_text("{}")
    (export / "README.md").write_text("# card\n")
    ev.write_record(export / "evaluation" / "evaluation.json",
                    _record("toy", {"clip": _est(30.0)}, {"clip": _est(27.0)}))  # fmt: skip
    (root / "not-a-run").mkdir()
    return root


def test_the_table_lists_the_teacher_every_run_and_export_with_their_values(runs):
    t = table.results(runs)
    assert list(t["name"]) == ["toy", "a", "b", "c", "export-a"]
    assert list(t["kind"]) == ["teacher", "run", "run", "run", "export"]
    by = t.set_index("name")
    assert by.loc["a", "fid"] == 12.5 and by.loc["a", "fid_low"] == 12.0 and by.loc["b", "psnr_high"] == 18.5
    assert by.loc["toy", "clip"] == 30.0 and by.loc["export-a", "clip"] == 27.0
    assert pd.isna(by.loc["c", "clip"]) and by.loc["c", "step"] == 50 and by.loc["b", "state"] == "done"
    assert list(t.columns[:6]) == list(table.HEAD) and t.columns[-1] == "path"
    assert "28.00 [27.50, 28.50]" in table.text(t)


def test_csv_round_trips(runs, tmp_path):
    t = table.results(runs)
    back = table.from_csv(table.to_csv(t, tmp_path / "t.csv"))
    pd.testing.assert_frame_equal(back, t, check_dtype=False)
    history = table.history(runs / "a")
    assert list(history.columns) == ["step", "loss/total"] and history["loss/total"].tolist() == [1.0, 0.5]
    pd.testing.assert_frame_equal(table.from_csv(table.to_csv(history, tmp_path / "h.csv")), history)
    with pytest.raises(WorkbenchError, match="no metrics.jsonl"):
        table.history(runs / "export-a")


def test_results_command(runs, tmp_path, capsys):
    assert main(["results", "--runs", str(runs), "--csv", str(tmp_path / "r.csv")]) == 0
    assert "5 rows" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "r.csv")["name"]) == ["toy", "a", "b", "c", "export-a"]
    assert main(["results", "--runs", str(runs)]) == 0
    assert "export-a" in capsys.readouterr().out
    assert main(["results", "--history", str(runs / "b"), "--csv", "-"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "step,loss/total"
    assert main(["results", "--runs", str(tmp_path / "nothing")]) == 2
    assert "not a folder of runs" in capsys.readouterr().err


def test_an_exports_card_gains_one_evaluation_section(tmp_path):
    export = tmp_path / "students" / "vega"
    (export / "unet").mkdir(parents=True)
    (export / "plan.json").write_text("{}")
    (export / "README.md").write_text("# vega\n\nbody\n")
    home = home_of(export / "unet")  # a pipeline export: the UNet in unet/
    assert home.folder == (export / "evaluation").resolve() and home.card == (export / "README.md").resolve()
    card_section(home.card, ["first table"])
    card_section(home.card, ["second table"])
    text = home.card.read_text()
    assert text.startswith("# vega\n\nbody\n") and text.count("## Evaluation (workbench evaluate)") == 1
    assert "second table" in text and "first table" not in text
    assert home_of(tmp_path) is None
