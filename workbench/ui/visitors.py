"""Whose runs a page works with: the owner's whole ``runs/`` folder, or on a shared Space the
visitor's own folder (``workbench.space``), with launches through one queue.

The Distill and Export tabs ask ``page_runs`` with the page's visitor key (``Shared.visitor``)
and act on a run only through ``Runs.own``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workbench import jobs, space
from workbench.errors import WorkbenchError
from workbench.ui.settings import AppSettings


def runs_root() -> Path:
    """``runs/`` beside the project, or ``$WORKBENCH_RUNS_DIR``."""
    env = os.environ.get("WORKBENCH_RUNS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "runs"


@dataclass(frozen=True)
class Runs:
    """Where a page's runs live and how they start. The owner: every run in ``folder``, each
    started at once. A Space visitor (``shared`` set): their own folder only, and launches
    wait in one queue across all visitors, at most ``cap`` training at a time."""

    folder: Path
    shared: Path | None = None  # Space: the runs root holding every visitor's folder
    cap: int = 1

    @property
    def space(self) -> bool:
        return self.shared is not None

    def own(self, run_dir: str | None) -> str:
        """``run_dir`` if this page may act on it (on a Space: one of the visitor's own runs)."""
        if not run_dir:
            raise WorkbenchError("select a run first")
        return str(space.own_run(self.folder, run_dir)) if self.space else run_dir

    def dispatch(self) -> None:
        """Start waiting runs while the Space has room (nothing to do for the owner)."""
        if self.space:
            jobs.dispatch(space.all_run_folders(self.shared), self.cap)

    def queue_line(self, run_dir: str) -> str | None:
        """Where a waiting run stands in the Space's queue; others' runs only as a count."""
        place = jobs.queue_position(run_dir, space.all_run_folders(self.shared)) if self.space else None
        if place is None:
            return None
        ahead, training = place
        return f"waiting for the CPU: #{ahead} in this Space's queue, {training} run(s) of other visitors training"


def page_runs(settings: AppSettings, visitor: str | None) -> Runs:
    """The runs a page works with: all of ``runs/`` for the owner, the visitor's own on a Space."""
    root = runs_root()
    if not settings.space:
        return Runs(root)
    return Runs(space.visitor_folder(root, visitor), shared=root, cap=settings.limits.max_active_runs)


def as_runs(root: Runs | Path | None) -> Runs:
    return root if isinstance(root, Runs) else Runs(root or runs_root())


def visible_runs(settings: AppSettings, visitor: str | None) -> Runs:
    """The page's runs; before a Space page knows its visitor, an empty folder of nobody's."""
    try:
        return page_runs(settings, visitor)
    except WorkbenchError:
        return Runs(runs_root() / space.VISITORS / "nobody", shared=runs_root())
