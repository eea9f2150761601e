"""Start, stop and resume distillation runs as background processes (used by the UI).

A run is an ordinary ``python -m workbench distill`` process writing its run folder, so
runs started here, from a shell, or before an app restart all look the same.

On the owner's machine a run starts at once (one at a time). On a shared Space a run is
submitted (``submit_run``: state ``waiting``, its command in ``launch.json``) and ``dispatch``
starts the longest-waiting runs whenever fewer than the Space's cap are training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.files import write_json_atomic
from workbench.runs import RunDir, effective_state, list_runs, read_json

STARTED = ("queued", "running")  # a process exists (or is starting)
PENDING = "launch.json"  # a waiting run's command line, until the queue starts it
_DISPATCH = threading.Lock()


def active_runs(root: str | Path) -> list[dict]:
    return [r for r in list_runs(root) if r["state"] in STARTED]


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
    run = _new_run(runs_root, name, files)
    pid = _spawn(run, _expand(argv, run))
    run.write_status(state="queued", pid=pid, step=0)  # visible at once, before the process writes
    return run


def _new_run(runs_root: str | Path, name: str, files: dict[str, str] | None) -> RunDir:
    run = RunDir(Path(runs_root) / name)
    if run.job.exists() or (run.root.exists() and any(run.root.iterdir())):
        raise WorkbenchError(f"a run named {name!r} already exists; choose another name")
    run.root.mkdir(parents=True, exist_ok=True)
    for file_name, text in (files or {}).items():
        (run.root / file_name).write_text(text, encoding="utf-8")
    return run


def _expand(argv: list[str], run: RunDir) -> list[str]:
    return [a.replace("{run}", str(run.root)) for a in argv]


def submit_run(runs_root: str | Path, name: str, argv: list[str], files: dict[str, str] | None = None) -> RunDir:
    """Like ``start_run``, but the process waits for ``dispatch`` (a shared Space's queue)."""
    run = _new_run(runs_root, name, files)
    _wait(run, _expand(argv, run))
    return run


def _wait(run: RunDir, argv: list[str]) -> None:
    write_json_atomic(run.root / PENDING, {"argv": argv, "submitted": time.time()})
    run.write_status(state="waiting", pid=None, error=None)


def dispatch(folders: list[Path], cap: int) -> list[RunDir]:
    """Start the longest-waiting runs in ``folders`` while fewer than ``cap`` are training."""
    with _DISPATCH:
        runs = [r for folder in folders for r in list_runs(folder)]
        free = cap - sum(r["state"] in STARTED for r in runs)
        started = []
        for run in _waiting(runs)[: max(0, free)]:
            argv = read_json(run.root / PENDING)["argv"]
            (run.root / PENDING).unlink()
            run.write_status(state="queued", pid=_spawn(run, argv), error=None)
            started.append(run)
        return started


def _waiting(runs: list[dict]) -> list[RunDir]:
    """Waiting runs, longest-waiting first."""
    waiting = [RunDir(Path(r["run_dir"])) for r in runs if r["state"] == "waiting"]
    waiting = [run for run in waiting if (run.root / PENDING).exists()]
    return sorted(waiting, key=lambda run: read_json(run.root / PENDING)["submitted"])


def queue_position(run_dir: str | Path, folders: list[Path]) -> tuple[int, int] | None:
    """(1-based place among waiting runs, runs training now), or None if it is not waiting."""
    runs = [r for folder in folders for r in list_runs(folder)]
    waiting = [run.root.resolve() for run in _waiting(runs)]
    here = Path(run_dir).resolve()
    if here not in waiting:
        return None
    return waiting.index(here) + 1, sum(r["state"] in STARTED for r in runs)


def resume_run(run_dir: str | Path, queued: bool = False) -> RunDir:
    """Start the run again from its last checkpoint; ``queued``: through the Space's queue."""
    run = RunDir(Path(run_dir))
    if not run.job.exists():
        raise WorkbenchError(f"{str(run.root)!r} holds no run to resume")
    state = effective_state(run.read_status())
    if state in ("waiting", "queued", "running"):
        raise WorkbenchError(f"run {run.root.name!r} is still {state}")
    if state == "done":
        raise WorkbenchError(f"run {run.root.name!r} has finished; start a new run to train further")
    run.clear_stop()
    if queued:
        _wait(run, ["--resume"])
    else:
        run.write_status(state="queued", pid=_spawn(run, ["--resume"]), error=None)
    return run


def stop_run(run_dir: str | Path, signal_too: bool = True) -> None:
    """Ask a run to checkpoint and stop (STOP file; SIGTERM as well if it is alive)."""
    run = RunDir(Path(run_dir))
    if effective_state(run.read_status()) == "waiting":  # not started: leave the queue
        (run.root / PENDING).unlink(missing_ok=True)
        run.write_status(state="stopped")
        return
    run.request_stop()
    pid = run.read_status().get("pid")
    if signal_too and pid and effective_state(run.read_status()) == "running":
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
