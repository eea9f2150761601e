"""The Gradio app: ``build_app(settings)`` lays out the page; ``serve(settings)`` launches it.

Layout: a header, the model box, then one tab per file in this package (Blocks, Presets,
Compare, Export, Distill). Tabs talk to
each other only through the session states in ``Shared`` (plain data) and the process-wide
model store.
"""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from workbench.errors import WorkbenchError
from workbench.ui import blocks_tab, compare_tab, distill_tab, export_tab, model_box, plan_view, presets_tab
from workbench.ui.settings import AppSettings
from workbench.ui.shared import Shared
from workbench.ui.store import Store, get_store, native_resolution

TITLE = "SDXL distillation workbench"
TABS = (
    ("Blocks", blocks_tab.build),
    ("Presets", presets_tab.build),
    ("Compare", compare_tab.build),
    ("Export", export_tab.build),
)
# The start model's weights load after the first page is served (or after this long without a
# visitor): on a 2-core machine, loading them (diffusers and transformers imports, ~10 s) beside
# the first page's handlers would delay the page by as much.
FIRST_PAGE_WAIT_S = 60.0
RESIZE_JS = "() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }"
INTRO = (
    "Make a smaller, faster SDXL UNet: **remove blocks** (left), watch parameters, FLOPs and latency "
    "(right), **compare** teacher and student images, and **export** the student as a stock diffusers "
    "UNet. Hover the map for any unit's details."
)
CSS = """
.wb-error {border-left: 4px solid #d93025; background: #fdecea; padding: 8px 12px; border-radius: 4px;}
.wb-notice {border-left: 4px solid #f29900; background: #fef7e0; padding: 8px 12px; border-radius: 4px;}
.wb-ok {border-left: 4px solid #188038; background: #e6f4ea; padding: 8px 12px; border-radius: 4px;}
.wb-muted {color: #666; font-size: 0.9em;}
/* The deltas panel stays in view while the toggles scroll, and scrolls itself when taller than the window. */
.wb-sticky {position: sticky; top: 8px; align-self: flex-start; max-height: calc(100vh - 16px); overflow-y: auto;
  flex-wrap: nowrap !important;}
.wb-sticky > * {flex-shrink: 0 !important;}
/* Gradio clips its container with overflow: hidden, which turns sticky positioning off; clip does not. */
.gradio-container {overflow: clip !important;}
.wb-stage {margin-bottom: 10px; padding: 4px 8px; border: 1px solid #e3e6ea;}
.wb-row label {font-size: 0.86em;}
.wb-row [data-testid="block-info"] {background: none !important; color: #333 !important; padding-left: 0 !important;
  font-weight: 600;}
#wb-numbers table {width: 100%; font-size: 0.95em;}
#wb-model-row {align-items: flex-end;}
#wb-load {max-height: 48px; margin-bottom: 6px;}
/* Compare: a cell no wider than an enlarged toy image, rather than one image stretched over the column. */
#wb-teacher .grid-container, #wb-student .grid-container {
  grid-template-columns: repeat(var(--grid-cols), minmax(100px, 272px)) !important;}
#wb-teacher .caption-label, #wb-student .caption-label {max-width: calc(100% - 8px); white-space: normal;
  font-size: 0.8em;}
"""


def theme() -> gr.themes.Base:
    # System fonts: the default theme fetches Google fonts, which an offline machine can't reach.
    system = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
    return gr.themes.Soft(
        primary_hue="blue", font=system, font_mono=["ui-monospace", "Consolas", "monospace"]
    )


def build_app(
    settings: AppSettings | None = None, store: Store | None = None, first_page: threading.Event | None = None
) -> gr.Blocks:
    """The whole page; no model is loaded here (handlers and ``warm_up`` do that). ``first_page``
    is set once a page has its first panel."""
    settings = settings or AppSettings()
    store = store or get_store()
    start, notice = model_box.start_base(store, settings.base)
    view = plan_view.new_view(start, native_resolution(store.base(start)))
    # Downloads (an SDXL student zip is ~5 GB) leave Gradio's cache an hour after they were made.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}" + (_space_note(settings) if settings.space else ""))
        box, load = model_box.build(start)
        ctx = Shared(
            settings=settings,
            store=store,
            demo=demo,
            view=gr.State(view),
            plan=gr.State([]),
            model_status=gr.Markdown(elem_id="wb-model-status"),
            first_page=first_page or threading.Event(),
        )
        with gr.Tabs():
            for label, build in TABS:
                with gr.Tab(label, id=label.lower()) as tab:
                    build(ctx)
                # Plots drawn while their tab was hidden are sized for 700 px; plotly resizes on this.
                tab.select(None, js=RESIZE_JS)
            _distill_tab(ctx)
        model_box.wire(ctx, box, load)
        _wire_page_load(ctx, notice)
    return demo


def _space_note(settings: AppSettings) -> str:
    lim = settings.limits
    return (
        f"\n\n<span class='wb-muted'>Shared CPU Space: at most {lim.max_steps} steps, {lim.max_seeds} seeds and "
        f"{lim.max_sample_px} px per comparison; weights of UNets up to {lim.max_weight_params / 1e9:g}B params. "
        "Run it locally for more.</span>"
    )


def _distill_tab(ctx: Shared) -> None:
    """The Distill tab; it gets the same ``Shared`` as the others."""
    with gr.Tab("Distill", id="distill") as tab:
        distill_tab.build(ctx)
    tab.select(None, js=RESIZE_JS)


def _wire_page_load(ctx: Shared, notice: str | None) -> None:
    store = ctx.store

    def on_page_load(view: dict[str, Any], device: str, dtype: str) -> tuple:
        out = (
            model_box.status_md(store, view["base"], notice),
            *blocks_tab.initial_panel(store, view, device, dtype),
        )
        ctx.first_page.set()
        return out

    ctx.demo.load(
        on_page_load,
        [ctx.view, *ctx.panel_inputs()],
        [ctx.model_status, ctx.resolution, *ctx.panel],
        api_visibility="private",
    )


def warm_up(store: Store, name: str, first_page: threading.Event | None = None) -> None:
    """Prepare the start model before the first visitor asks: units, FLOPs, layout; then,
    once the first page is served (``first_page``), its weights."""
    try:
        base = store.base(name)
        px = native_resolution(base)
        blocks_tab.cached_board(store, name, px)
        plan_view.arch_map(store, name, px)
        if first_page is not None:
            first_page.wait(FIRST_PAGE_WAIT_S)
        if base.has_pipeline:
            store.pipeline(name)
    except WorkbenchError as err:  # the page shows the same error when it asks
        print(f"workbench: warm-up of {name!r} stopped: {err}")


def serve(settings: AppSettings) -> None:
    """Build and launch; the start model warms up in the background while the page is served."""
    first_page = threading.Event()
    demo = build_app(settings, first_page=first_page)
    store = get_store()
    start, _ = model_box.start_base(store, settings.base)
    threading.Thread(target=warm_up, args=(store, start, first_page), name="warm-up", daemon=True).start()
    demo.queue(default_concurrency_limit=4).launch(
        server_name=settings.host,
        server_port=settings.port,
        theme=theme(),
        css=CSS,
        show_error=True,
        allowed_paths=[str(distill_tab.runs_root())],  # sample grids of runs kept outside the project
    )
