"""Progress callbacks shared by long jobs: ``progress(fraction in [0, 1], message)``."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def report(progress: Progress | None, fraction: float, message: str) -> None:
    """Call ``progress`` (if any) with ``fraction`` clamped to [0, 1]."""
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def scaled(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """A callback mapping [0, 1] onto [lo, hi] of ``progress`` (for one phase of a job)."""
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * f, msg)
