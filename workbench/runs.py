"""The run folder: the only channel between a distillation process and everything else.

```
RUN/
  job.json        the full configuration (plans included), written once at start
  status.json     state (queued/running/done/failed/stopped), step, pid, error; atomic
  metrics.jsonl   one flushed JSON line per logged step: step, time, lr, loss/...
  samples/        teacher-vs-student grids on fixed seeds: step_000100.png, ...
  checkpoints/    step_000100/ (student, optimizer, scheduler, RNG, data position)
  student/        the final diffusers UNet folder + plan.json + layer_map.json + README.md
  STOP            created by whoever wants the run to stop; the run checkpoints and exits
  log.txt         the process's stdout/stderr when started by `jobs.start`
```

Writers replace whole files atomically (write a temporary file, then rename), so a reader
never sees half a JSON file and a crash never corrupts what was already there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

STATES = ("queued", "running", "done", "failed", "stopped")
ACTIVE = ("queued", "running")


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def request_stop(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)


class MetricsWriter:
    """Appends one JSON line per logged step, flushed, so readers and crashes see whole rows."""

    def __init__(self, run: RunDir, truncate_after_step: int | None = None) -> None:
        self.path = run.metrics
        if truncate_after_step is not None:
            _truncate_metrics(self.path, truncate_after_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    rows, _ = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


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
