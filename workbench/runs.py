"""The run folder: the only channel between a distillation process and everything else.

```
RUN/
  job.json        the full configuration (plans included), written once at start
  status.json     state (waiting/queued/running/done/failed/stopped), step, pid, error; atomic
  launch.json     a waiting run's command, until the Space's queue starts it
  metrics.jsonl   one flushed JSON line per logged step: step, time, lr, loss/...
  samples/        teacher-vs-student grids on fixed seeds: step_000100.png, ...
  checkpoints/    step_000100/ (student, optimizer, scheduler, RNG, data position, checkpoint.json)
  stages/         stage_1/, ...: each finished stage's student (the next stage starts from it)
  targets/        stage_1/rank_0/step_N_M.safetensors: precomputed teacher targets (deleted with their stage)
  student/        the final diffusers UNet folder + plan.json + layer_map.json + README.md
  STOP            created by whoever wants the run to stop; the run checkpoints and exits
  log.txt         the process's stdout/stderr when started by `jobs.start`
```

Writers replace whole files atomically (``workbench.files``), so a reader never sees half a
JSON file and a crash never corrupts what was already there. A checkpoint is written into
``step_N.tmp/`` and renamed when complete; the last ``keep`` are kept.

This module also holds what a running process uses to talk through the folder: the
``Stopper`` (STOP file and signals) and the ``Reporter`` (status, log lines, ETA).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.files import remove_tree, write_json_atomic, write_text_atomic
from workbench.progress import Progress

# waiting: in the Space's queue, no process yet; queued: process started, not yet training
STATES = ("waiting", "queued", "running", "done", "failed", "stopped")
ACTIVE = ("waiting", "queued", "running")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as err:
        raise WorkbenchError(f"{path} is not valid JSON ({err.msg}); the run folder is damaged") from None


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    job = property(lambda self: self.root / "job.json")
    status = property(lambda self: self.root / "status.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    samples = property(lambda self: self.root / "samples")
    checkpoints = property(lambda self: self.root / "checkpoints")
    student = property(lambda self: self.root / "student")
    stop_file = property(lambda self: self.root / "STOP")
    log = property(lambda self: self.root / "log.txt")

    def read_status(self) -> dict[str, Any]:
        return read_json(self.status, default={}) or {}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into status.json (atomically) and return the new status."""
        status = self.read_status() | fields | {"updated": time.time()}
        if status.get("state") not in STATES:
            raise ValueError(f"unknown run state {status.get('state')!r}")
        write_json_atomic(self.status, status)
        return status

    def read_job(self) -> dict[str, Any]:
        return read_json(self.job, default={}) or {}

    def write_job(self, config: dict[str, Any], base, stages: list[dict[str, Any]]) -> None:
        """job.json: the full configuration, the teacher (a ``models.Base``), each stage's
        summary, and the command that started the run."""
        job = {"config": config, "base": {"name": base.name, "location": base.location}, "stages": stages,
               "command": " ".join(sys.argv), "created": time.time()}  # fmt: skip
        write_json_atomic(self.job, job)

    def record_resume(self, config: dict[str, Any], changed: list[dict[str, Any]]) -> None:
        """A resume that changed the run: job.json gets the new config and, in its ``resumed``
        list, what changed (``{"field", "was", "now"}``) and when."""
        job = self.read_job()
        job["config"] = config
        job.setdefault("resumed", []).append({"time": time.time(), "changed": changed})
        write_json_atomic(self.job, job)

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def request_stop(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    # checkpoints and stage students
    def stage_dir(self, k: int) -> Path:
        """Where stage ``k`` (0-based)'s finished student is kept."""
        return self.root / "stages" / f"stage_{k + 1}"

    def targets(self, k: int) -> Path:
        """Where stage ``k`` (0-based)'s precomputed teacher targets are kept (``workbench.targets``)."""
        return self.root / "targets" / f"stage_{k + 1}"

    def stage_done(self, k: int) -> bool:
        return (self.stage_dir(k) / "config.json").exists()

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a ``.tmp`` one was interrupted)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))

    def commit_checkpoint(self, tmp: Path, info: dict[str, Any], keep: int) -> Path:
        """Complete a checkpoint written into ``tmp`` (``step_N.tmp``): add ``info``, rename it
        to ``step_N``, and keep only the last ``keep`` checkpoints."""
        write_json_atomic(tmp / "checkpoint.json", info)
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        remove_tree(final)
        tmp.rename(final)
        for old in self.list_checkpoints()[:-keep]:
            remove_tree(old)
        return final

    def resume_point(self, steps_per_stage: int) -> tuple[int, Path | None]:
        """(stage to train next, checkpoint to start it from or None) for a resumed run."""
        found = self.list_checkpoints()
        if not found:
            return 0, None
        info = read_checkpoint_info(found[-1])
        if info["stage_step"] == steps_per_stage - 1 and self.stage_done(info["stage"]):
            return info["stage"] + 1, None
        return info["stage"], found[-1]  # a finished stage whose student wasn't saved re-saves it


def read_checkpoint_info(folder: Path) -> dict[str, Any]:
    """What ``commit_checkpoint`` recorded: stage, stage_step, step, data_position."""
    return json.loads((Path(folder) / "checkpoint.json").read_text(encoding="utf-8"))


class MetricsWriter:
    """Appends one JSON line per logged step, flushed, so readers and crashes see whole rows.

    ``enabled=False`` (processes other than the main one) writes nothing."""

    def __init__(self, run: RunDir, truncate_after_step: int | None = None, enabled: bool = True) -> None:
        self.path = run.metrics
        self._file = None
        if not enabled:
            return
        if truncate_after_step is not None:
            _truncate_metrics(self.path, truncate_after_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    rows, _ = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Rows from byte ``offset`` on, and the offset after the last complete line.

    A partly written last line is left for the next call, so polling readers never parse
    half a row.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_state(status: dict[str, Any]) -> str:
    """The state, with 'running' runs whose process is gone reported as 'failed'."""
    state = status.get("state", "queued")
    if state in ACTIVE and status.get("pid") and not pid_alive(status["pid"]):
        return "failed"
    return state


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run folder under ``root`` (newest first) with its job name and status."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for folder in root.iterdir():
        run = RunDir(folder)
        if not (run.job.exists() or run.status.exists()):
            continue
        try:
            status = run.read_status()
        except WorkbenchError:
            status = {"state": "failed", "error": "status.json is damaged"}
        runs.append(
            {
                "run_dir": str(folder),
                "name": folder.name,
                "state": effective_state(status),
                "step": status.get("step", 0),
                "total_steps": status.get("total_steps"),
                "updated": status.get("updated", folder.stat().st_mtime),
                "error": status.get("error"),
            }
        )
    return sorted(runs, key=lambda r: r["updated"], reverse=True)


# --------------------------------------------------------------------------- a running process


class Stopper:
    """Stop when the STOP file appears or SIGTERM/SIGINT arrives; checked between steps."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.signalled = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signalled = True

    def should_stop(self) -> bool:
        return self.signalled or self.run.stop_requested()


class Reporter:
    """What a run tells the world: status.json and timestamped log lines with elapsed time and
    ETA. Only the main process reports (``main=False``: silent)."""

    def __init__(self, run: RunDir, main: bool = True, started: float | None = None) -> None:
        self.run, self.main = run, main
        self.started = time.time() if started is None else started

    def status(self, state: str, **fields: Any) -> dict[str, Any]:
        if not self.main:
            return {"state": state, "main": False}
        return self.run.write_status(state=state, **fields)

    def log(self, message: str) -> None:
        if self.main:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def progress(self, fraction: float, message: str) -> None:
        """A log line: ``fraction`` done, elapsed and estimated remaining seconds."""
        elapsed = time.time() - self.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else float("nan")
        self.log(f"{fraction:6.1%} {message} (elapsed {elapsed:.0f}s, eta {eta:.0f}s)")

    def phase(self, lo: float, hi: float, what: str) -> Progress:
        """A callback for measuring ``what``, one phase of a job (mapped onto [lo, hi]): the
        status message at every call, a log line per 10%."""
        shown = [-1]

        def progress(fraction: float, message: str) -> None:
            f = lo + (hi - lo) * fraction
            self.status("running", message=f"measuring {what} {f:.0%}: {message}")
            if int(f * 10) != shown[0]:
                shown[0] = int(f * 10)
                self.log(f"{what} {f:6.1%} {message}")

        return progress


# Crash drill for tests: WORKBENCH_FAULT_STEP=N raises inside the training loop at global step
# N; WORKBENCH_FAULT_KIND=oom raises torch.OutOfMemoryError there (as a GPU out of memory would).
FAULT_ENV, FAULT_KIND_ENV = "WORKBENCH_FAULT_STEP", "WORKBENCH_FAULT_KIND"


def fault_step() -> int:
    return int(os.environ.get(FAULT_ENV, "-1"))


def inject_fault(step: int, at: int) -> None:
    import torch

    if step == at:
        kind = torch.OutOfMemoryError if os.environ.get(FAULT_KIND_ENV) == "oom" else RuntimeError
        raise kind(f"injected fault at step {step} ({FAULT_ENV})")
