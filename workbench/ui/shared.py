"""What the tabs share: session states, the deltas panel's components, and small adapters.

Each tab's ``build(ctx)`` adds its components and wires its events through a ``Shared``;
the Distill tab (``workbench/ui/distill_tab.py``) gets the same object.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from workbench.errors import WorkbenchError
from workbench.ui import format as fmt
from workbench.ui import plan_view, plots
from workbench.ui.settings import AppSettings
from workbench.ui.store import Store

MODEL_QUEUE = "model"  # every handler that touches weights or times the CPU waits in this one queue


@dataclass
class Shared:
    """Components and settings every tab may read or update."""

    settings: AppSettings
    store: Store
    demo: gr.Blocks
    view: gr.State  # plan_view.new_view(...): base, resolution, removed, rev
    plan: gr.State  # list[str]: the unit ids the user removed (the toggles' union)
    model_status: gr.Markdown
    device: gr.Dropdown | None = None  # latency settings, created by the Blocks tab
    dtype: gr.Dropdown | None = None
    resolution: gr.Dropdown | None = None
    panel: list[gr.components.Component] = field(default_factory=list)  # numbers, notes, map, bars
    first_page: threading.Event = field(default_factory=threading.Event)  # set once a page has its panel
    # Space: the visitor's key (``workbench.space.visitor_key``; None on the owner's machine),
    # set when the page loads; events that need it run after ``visitor_ready``.
    visitor: gr.State | None = None
    visitor_ready: Any = None

    def __post_init__(self) -> None:
        # Built inside the page's Blocks; a page that sets no visitor (tests, one tab alone)
        # gets an empty one, known at once.
        if self.visitor is None:
            self.visitor = gr.State(None)
        if self.visitor_ready is None:
            self.visitor_ready = self.demo.load(None, None, None, api_visibility="private")

    def panel_inputs(self) -> list[gr.components.Component]:
        """Inputs a handler needs to redraw the deltas panel, after its own."""
        return [self.device, self.dtype]

    def model_event(self) -> dict[str, Any]:
        """Event options for handlers that load weights or time the CPU: one shared queue."""
        return {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}


def plot(figure: dict[str, Any] | None) -> PlotData | None:
    """A plotly JSON dict as gr.Plot's payload (skips plotly's slow figure validation)."""
    return None if figure is None else PlotData(type="plotly", plot=plots.to_json(figure))


def panel_updates(store: Store, view: dict[str, Any], removed: list[str], device: str, dtype: str) -> tuple:
    """Values for ``Shared.panel``; an impossible plan keeps the last valid numbers and map."""
    p = plan_view.panel(store, view, removed, device, dtype)
    if p.error is not None:
        return (gr.skip(), p.notes_md, gr.skip(), gr.skip())
    return (p.numbers_md, p.notes_md, plot(p.arch), plot(p.bars))


def user_errors(fn: Callable) -> Callable:
    """Show a WorkbenchError (bad input, impossible plan, missing weights) as a toast; keep every
    output as it was.

    Not ``raise gr.Error``: Gradio marks every output of an event that raised as errored and
    draws a red "Error" over each one, until that output is next updated.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as err:
            gr.Warning(str(err))
            return gr.skip()  # one skip for any number of outputs

    return wrapper


def inline_errors(n_outputs: int, status_at: int) -> Callable[[Callable], Callable]:
    """Show a WorkbenchError in the handler's own status Markdown (and as a toast), keep the rest.

    For tabs with a status line next to their buttons, where a message that stays beats a
    toast that fades.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except WorkbenchError as err:
                gr.Warning(str(err))
                out: list[Any] = [gr.skip()] * n_outputs
                out[status_at] = fmt.error_md(str(err))
                return tuple(out) if n_outputs > 1 else out[0]

        return wrapper

    return decorate


class ProgressAdapter:
    """A ``(fraction, desc)`` callback for core functions, driving a gr.Progress bar."""

    def __init__(self, progress: Any, start: float = 0.0, end: float = 1.0) -> None:
        self.progress, self.start, self.end = progress, start, end

    def __call__(
        self, fraction: float | None = None, desc: str | None = None, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(fraction, tuple) and len(fraction) == 2 and fraction[1]:
            fraction = fraction[0] / fraction[1]
        if not isinstance(fraction, (int, float)):
            fraction = 0.0
        self.progress(self.start + (self.end - self.start) * float(fraction), desc=desc)
