"""The results table: the teacher, every run and every export with every metric and its interval.

One row per model: the teacher of each base (from the newest evaluation record that scored
it), each run folder under the runs root and each export folder found beside them. Columns:
``kind`` (teacher/run/export), ``name``, ``base``, ``state``, ``step`` (runs), ``samples``,
then for every metric ``<metric>``, ``<metric>_low`` and ``<metric>_high`` (95% interval;
KID's is +- one standard deviation over subsets, as its protocol says), and ``path``.
A model not yet evaluated has a row with empty metric cells, so nothing is silently left out.

Scores come from each folder's ``evaluation/evaluation.json`` (``python -m workbench
evaluate --unet RUN/student`` writes it); a run's loss history is ``metrics.jsonl``, turned
into a table by :func:`history`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.evaluation.core import ORDER, read_record
from workbench.evaluation.home import FOLDER, RECORD, is_export, is_run
from workbench.runs import RunDir, effective_state, read_metrics

HEAD = ("kind", "name", "base", "state", "step", "samples")
ENV = "WORKBENCH_RUNS_DIR"


def default_root() -> Path:
    """``$WORKBENCH_RUNS_DIR``, or ``runs/`` beside the project (where the app starts runs)."""
    env = os.environ.get(ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "runs"


def _record(folder: Path) -> dict[str, Any] | None:
    path = folder / FOLDER / RECORD
    return read_record(path) if path.is_file() else None


def _metric_cells(summary: dict[str, Any] | None) -> dict[str, float]:
    cells: dict[str, float] = {}
    for key, est in (summary or {}).items():
        cells |= {key: est["mean"], f"{key}_low": est["low"], f"{key}_high": est["high"]}
    return cells


def _run_row(folder: Path, record: dict[str, Any] | None) -> dict[str, Any]:
    run = RunDir(folder)
    status = run.read_status()
    base = (run.read_job().get("base") or {}).get("name")
    return {
        "kind": "run", "name": folder.name, "base": (record or {}).get("base") or base,
        "state": effective_state(status) if status else None, "step": status.get("step"),
    }  # fmt: skip


def _row(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    record = _record(folder)
    if is_run(folder):
        row = _run_row(folder, record)
    else:
        row = {"kind": "export", "name": folder.name, "base": (record or {}).get("base")}
    row["samples"] = record["settings"]["samples"] if record else None
    return row | _metric_cells(record["student"] if record else None) | {"path": str(folder)}, record


def _teacher_rows(records: list[tuple[float, dict[str, Any], Path]]) -> list[dict[str, Any]]:
    """One row per base: the teacher's scores from its newest record that has any."""
    rows: dict[str, dict[str, Any]] = {}
    for _, record, folder in sorted(records, key=lambda r: r[0], reverse=True):
        if record["teacher"] and record["base"] not in rows:
            rows[record["base"]] = {
                "kind": "teacher", "name": record["base"], "base": record["base"],
                "samples": record["settings"]["samples"],
            } | _metric_cells(record["teacher"]) | {"path": str(folder / FOLDER / RECORD)}  # fmt: skip
    return list(rows.values())


def folders(*roots: str | Path) -> list[Path]:
    """Run and export folders directly under each root (sorted by name)."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise WorkbenchError(f"{str(root)!r} is not a folder of runs or exports")
        found += [f for f in sorted(root.iterdir()) if f.is_dir() and (is_run(f) or is_export(f))]
    return found


def results(*roots: str | Path) -> pd.DataFrame:
    """The table of every teacher, run and export under ``roots`` (see the module docstring)."""
    rows, records = [], []
    for folder in folders(*roots):
        row, record = _row(folder)
        rows.append(row)
        if record is not None:
            records.append(((folder / FOLDER / RECORD).stat().st_mtime, record, folder))
    table = pd.DataFrame(_teacher_rows(records) + rows)
    return _ordered(table)


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    metrics = [k for k in ORDER if k in table.columns]
    cols = [*HEAD, *[c for k in metrics for c in (k, f"{k}_low", f"{k}_high")], "path"]
    table = table.reindex(columns=cols)
    return table.astype({"step": "Int64", "samples": "Int64"})  # whole numbers, empty where unknown


def history(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``metrics.jsonl`` as a table: one row per logged step, one column per key."""
    run = RunDir(Path(run_dir))
    if not run.metrics.is_file():
        raise WorkbenchError(f"{str(run_dir)!r} has no metrics.jsonl; give a run folder that has trained")
    rows, _ = read_metrics(run.metrics)
    return pd.DataFrame(rows)


def to_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` as CSV (no index column)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def from_csv(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path)


def text(table: pd.DataFrame) -> str:
    """The table for a terminal: name columns and metric means with intervals."""
    if table.empty:
        return "no runs or exports found"
    metrics = [k for k in ORDER if k in table.columns]
    shown = table[["kind", "name", "state", "step"]].astype(object)
    for k in metrics:
        shown[k] = [_cell(m, lo, hi) for m, lo, hi in zip(table[k], table[f"{k}_low"], table[f"{k}_high"])]
    return shown.fillna("-").to_string(index=False)


def _cell(mean: float, low: float, high: float) -> str:
    if pd.isna(mean):
        return "-"
    digits = 2 if abs(mean) >= 10 else 3 if abs(mean) >= 0.01 or mean == 0 else 5
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
