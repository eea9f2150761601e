"""The model box above the tabs: which teacher the session works on, and loading another one."""

from __future__ import annotations

from typing import Any

import gradio as gr

from workbench import space
from workbench.errors import WorkbenchError
from workbench.models import BUILTIN_CONFIGS, Base
from workbench.ui import format as fmt
from workbench.ui import plan_view
from workbench.ui.settings import Limits
from workbench.ui.shared import ProgressAdapter, Shared, panel_updates
from workbench.ui.store import Store, native_resolution

FALLBACK_BASE = "sdxl-base"
KIND_WORDS = {
    "toy": "the embedded toy SDXL pipeline (tiny widths, SDXL's exact topology)",
    "builtin": "a built-in UNet config without weights",
    "pipeline": "a local diffusers pipeline folder",
    "unet": "a local UNet folder (no text encoders or VAE)",
    "hub": "a Hugging Face hub model",
}


def start_base(store: Store, requested: str) -> tuple[str, str | None]:
    """The base to open with, and a notice when the requested one is not there (e.g. no toy yet)."""
    try:
        store.base(requested)
        return requested, None
    except WorkbenchError as err:
        return FALLBACK_BASE, (
            f"{err}. Showing SDXL's UNet config instead: planning, FLOPs and latency estimates work; "
            "sampling and export need weights, so load a model in the box above."
        )


def capabilities(base: Base) -> str:
    if base.has_pipeline:
        return "plan, compare samples and export"
    if base.has_weights:
        return "plan and export (sampling needs a full pipeline)"
    return "plan, FLOPs and latency estimates (sampling and export need weights)"


def status_md(store: Store, name: str, notice: str | None = None) -> str:
    """One paragraph on the loaded teacher: what it is, its size and topology, what works with it."""
    base, catalog = store.base(name), store.catalog(name)
    text = (
        f"**Teacher: {fmt.escape(name)}** — {KIND_WORDS.get(base.kind, base.kind)}; "
        f"UNet {fmt.params(catalog.total_params)} params, native {native_resolution(base)} px. "
        f"Here you can {capabilities(base)}.  \n"
        f"<span class='wb-muted'>{fmt.escape(catalog.topology.describe())}</span>"
    )
    return text + ("\n\n" + fmt.notice_md(notice) if notice else "")


def check_weight_limit(store: Store, name: str, limits: Limits) -> None:
    total = store.catalog(name).total_params
    if limits.max_weight_params is not None and total > limits.max_weight_params:
        raise WorkbenchError(
            f"{name!r} has a {fmt.params(total)}-parameter UNet; this app loads weights only up to "
            f"{fmt.params(limits.max_weight_params)} (WORKBENCH_SPACE limits). Its config is loaded for planning"
        )


def load_model(
    store: Store,
    limits: Limits,
    text: str,
    view: dict[str, Any],
    plan: list[str],
    device: str,
    dtype: str,
    progress: Any = None,
    visitor_names: bool = False,
) -> tuple:
    """Resolve, catalog, price and (if it has weights) load a teacher; keep the plan if it fits.
    ``visitor_names`` (a Space): built-in names and hub ids only, never a folder on the server."""
    report = ProgressAdapter(progress) if progress is not None else (lambda *a, **k: None)
    name = (text or "").strip()
    if not name:
        raise WorkbenchError(
            f"type a model: toy, {', '.join(BUILTIN_CONFIGS)}, a local diffusers folder or a hub id"
        )
    if visitor_names:
        space.check_base_name(name)
    report(0.05, f"resolving {name}")
    base = store.base(name)
    report(0.15, "listing removable units")
    store.catalog(name)
    px = native_resolution(base)
    report(0.3, f"counting FLOPs per unit at {px} px")
    store.pricing(name, px)
    notice = _load_weights(store, limits, base, ProgressAdapter(report, 0.4, 0.95))
    kept, plan_note = _carry_plan(store, name, plan)
    new = plan_view.next_view(view, base=name, resolution=px, removed=kept)
    status = status_md(store, name, " ".join(n for n in (notice, plan_note) if n) or None)
    resolution = gr.update(choices=plan_view.resolution_choices(store, name), value=px)
    return (new, kept, status, resolution, *panel_updates(store, new, kept, device, dtype))


def load_or_explain(
    store: Store, limits: Limits, text: str, view: dict[str, Any], plan: list[str], device: str,
    dtype: str, n_panel: int, progress: Any = None, visitor_names: bool = False,
) -> tuple:  # fmt: skip
    """``load_model``'s outputs; if the load fails, the reason in the status line above the
    current teacher's, and every other output kept (nothing marked as errored)."""
    try:
        return load_model(store, limits, text, view, plan, device, dtype, progress, visitor_names)
    except WorkbenchError as err:
        gr.Warning(str(err))
        status = fmt.error_md(str(err), "Could not load that model") + "\n\n" + status_md(store, view["base"])
        return (gr.skip(), gr.skip(), status, *(gr.skip(),) * (1 + n_panel))


def _load_weights(store: Store, limits: Limits, base: Base, report: ProgressAdapter) -> str | None:
    if not base.has_weights:
        return None
    try:
        check_weight_limit(store, base.name, limits)
    except WorkbenchError as err:
        return str(err)
    report(0.0, "loading weights")
    if base.has_pipeline:
        store.pipeline(base.name, report)
    else:
        store.teacher_unet(base.name, report)
    return None


def _carry_plan(store: Store, name: str, plan: list[str]) -> tuple[list[str], str | None]:
    """Keep the current plan on a model of the same topology; start empty otherwise."""
    if not plan:
        return [], None
    try:
        store.spec(name, plan)
        return list(plan), None
    except WorkbenchError:
        return [], "The previous plan does not fit this model, so the plan starts empty."


def build(start: str, space_mode: bool = False) -> tuple[gr.Dropdown, gr.Button]:
    """The model picker row (wired later by ``wire``, once the panel it updates exists)."""
    kinds = "" if space_mode else " a local diffusers folder (pipeline or UNet) or"
    with gr.Row(equal_height=False, elem_id="wb-model-row"):
        box = gr.Dropdown(
            choices=["toy", *BUILTIN_CONFIGS],
            value=start,
            allow_custom_value=True,
            label="Teacher model",
            info=f"toy, a built-in config (no weights),{kinds} a hub id",
            scale=5,
        )
        load = gr.Button("Load", variant="primary", scale=1, min_width=120, elem_id="wb-load")
    return box, load


def wire(ctx: Shared, box: gr.Dropdown, load: gr.Button) -> None:
    store, limits = ctx.store, ctx.settings.limits

    def on_load(text, view, plan, device, dtype, progress=gr.Progress()):
        return load_or_explain(
            store, limits, text, view, plan, device, dtype, len(ctx.panel), progress, ctx.settings.space
        )

    gr.on(
        [load.click, box.select],
        on_load,
        [box, ctx.view, ctx.plan, *ctx.panel_inputs()],
        [ctx.view, ctx.plan, ctx.model_status, ctx.resolution, *ctx.panel],
        api_visibility="private",
        **ctx.model_event(),
    )
