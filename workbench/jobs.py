"""Start, stop and resume distillation runs as background processes (used by the UI).

A run is an ordinary ``python -m workbench distill`` process writing its run folder, so
runs started here, from a shell, or before an app restart all look the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.runs import RunDir, effective_state, list_runs


def active_runs(root: str | Path) -> list[dict]:
    return [r for r in list_runs(root) if r["state"] in ("queued", "running")]


def _spawn(run: RunDir, argv: list[str]) -> int:
    run.root.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(run.log, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", "distill", *argv, "--run-dir", str(run.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the app; stopped through its STOP file
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )
    return proc.pid


def start_run(
    runs_root: str | Path,
    name: str,
    argv: list[str],
    allow_parallel: bool = False,
    files: dict[str, str] | None = None,
) -> RunDir:
    """Launch ``distill`` with CLI ``argv`` into ``runs_root/name``; one run at a time by default.

    ``files`` (name -> text) are written into the run folder first, e.g. the plan the run
    trains (``argv`` can name them as ``{run}/NAME``).
    """
    if not allow_parallel and (busy := active_runs(runs_root)):
        raise WorkbenchError(
            f"run {busy[0]['name']!r} is still {busy[0]['state']}; stop it first (one run at a time on this machine)"
        )
    run = RunDir(Path(runs_root) / name)
    if run.job.exists() or (run.root.exists() and any(run.root.iterdir())):
        raise WorkbenchError(f"a run named {name!r} already exists; choose another name")
    run.root.mkdir(parents=True, exist_ok=True)
    for file_name, text in (files or {}).items():
        (run.root / file_name).write_text(text, encoding="utf-8")
    pid = _spawn(run, [a.replace("{run}", str(run.root)) for a in argv])
    run.write_status(state="queued", pid=pid, step=0)  # visible at once, before the process writes
    return run


def resume_run(run_dir: str | Path) -> RunDir:
    run = RunDir(Path(run_dir))
    if not run.job.exists():
        raise WorkbenchError(f"{str(run.root)!r} holds no run to resume")
    state = effective_state(run.read_status())
    if state in ("queued", "running"):
        raise WorkbenchError(f"run {run.root.name!r} is still {state}")
    if state == "done":
        raise WorkbenchError(f"run {run.root.name!r} has finished; start a new run to train further")
    run.clear_stop()
    run.write_status(state="queued", pid=_spawn(run, ["--resume"]), error=None)
    return run


def stop_run(run_dir: str | Path, signal_too: bool = True) -> None:
    """Ask a run to checkpoint and stop (STOP file; SIGTERM as well if it is alive)."""
    run = RunDir(Path(run_dir))
    run.request_stop()
    pid = run.read_status().get("pid")
    if signal_too and pid and effective_state(run.read_status()) == "running":
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
