"""A run's losses, config and sample grids, also in the tracker people use (``--report-to``).

Through accelerate's own tracker classes (``accelerate.tracking``), the ones every diffusers
training script's ``--report_to`` uses: ``tensorboard`` (event files in ``RUN/trackers/``,
``tensorboard --logdir RUN/trackers``), ``wandb`` and ``trackio`` (their own login and
project; the project is the run folder's name). ``none`` (the default) reports nowhere.

The run folder's ``metrics.jsonl`` stays the source of truth for the app and the results
table; a tracker only mirrors it, from the main process. A tracker that fails to start is
a precise error before training; one that fails mid-run is the tracker's problem and is
reported once in the run's log, never a reason to lose the run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workbench.errors import ConfigError

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
FOLDER = "trackers"  # inside the run folder, for trackers that write files (TensorBoard)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check(report_to: str) -> None:
    """Refuse an unknown tracker or one whose package is missing, before anything loads."""
    if report_to not in REPORT_TO:
        raise ConfigError("report_to", "{field} {got!r}: choose from {choices}", got=report_to,
                          choices=", ".join(REPORT_TO))  # fmt: skip
    package = _PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError("report_to", "{field} {got} needs the {package} package: pip install {package}",
                          got=report_to, package=package)  # fmt: skip


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as the flat scalars trackers take (lists and plans as JSON-ish text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, f"{name}/")
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = "" if value is None else str(value)
    return out


class Trackers:
    """The run's trackers (none, or one of ``REPORT_TO``); every method is a no-op when off."""

    def __init__(self, report_to: str, run_dir: str | Path, enabled: bool = True,
                 log: Callable[[str], None] | None = None) -> None:  # fmt: skip
        check(report_to)
        self.kind, self.log_line, self.failed = report_to, log, False
        self.tracker = _make(report_to, Path(run_dir)) if enabled and report_to != "none" else None
        if self.tracker is not None:
            self.tracker.start()

    def config(self, values: dict[str, Any]) -> None:
        self._call(lambda t: t.store_init_configuration(_flat(values)))

    def log(self, row: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self._call(lambda t: t.log(scalars, step=step))

    def grid(self, path: str | Path, step: int) -> None:
        """A sample grid PNG (teacher row over student row) as an image, where the tracker takes images."""
        if self.tracker is None or not hasattr(self.tracker, "log_images") or not Path(path).is_file():
            return
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        kwargs = {"dataformats": "HWC"} if self.kind == "tensorboard" else {}
        self._call(lambda t: t.log_images({"samples": [array] if self.kind != "tensorboard" else array},
                                          step=step, **kwargs))  # fmt: skip

    def close(self) -> None:
        self._call(lambda t: t.finish())
        self.tracker = None

    def _call(self, what: Callable[[Any], Any]) -> None:
        if self.tracker is None or self.failed:
            return
        try:
            what(self.tracker)
        except Exception as err:  # noqa: BLE001 - a tracker's failure must not end the run
            self.failed = True
            if self.log_line:
                self.log_line(f"tracker {self.kind} failed and is off for the rest of the run: {err}")


def _make(kind: str, run_dir: Path):
    from accelerate import tracking  # heavy: only when a tracker is asked for

    name = run_dir.name or "run"
    if kind == "tensorboard":
        return tracking.TensorBoardTracker(name, run_dir / FOLDER)
    if kind == "wandb":
        return tracking.WandBTracker(name)
    return tracking.TrackioTracker(name)
