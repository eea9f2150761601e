"""Blocks tab, top: the sensitivity heatmap over the block map, and auto-prune as a slider.

The heatmap colours every removable unit by what removing it alone does to the teacher's
prediction (noise or v; ``workbench.sensitivity``); a cached map is shown as soon as its base is,
and *Measure sensitivity* measures one (minutes on a real model; cached on disk after).

*Auto-prune* finds the least damaging valid plan that keeps at most a fraction of the
teacher's parameters, FLOPs or estimated latency (``workbench.autoprune``) and puts it on
the toggles exactly as if the user had ticked those units, so the deltas, notes, presets
and export work on it unchanged. The loaded teacher and its recorded calibration calls
(a ``sensitivity.Probe``) stay in the store, so a second auto-prune neither reloads nor
re-records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench import autoprune, sensitivity
from workbench.catalog import natural_key
from workbench.errors import WorkbenchError
from workbench.progress import Progress
from workbench.ui import format as fmt
from workbench.ui import plan_view, plots
from workbench.ui.shared import ProgressAdapter, Shared, inline_errors, panel_updates, plot
from workbench.ui.store import Store

BUDGET_WORDS = {"params": "parameters", "flops": "FLOPs", "latency": "estimated latency"}
# Static first in the UI: a slider should answer at once; rescored (the CLI's default) finds
# less damaging plans but measures a few hundred of them (about 3-4 min for the toy on a CPU).
METHOD_CHOICES = [
    ("static (map only, instant)", "static"),
    ("rescored (measures plans, minutes)", "rescored"),
]
DEFAULT_KEEP = 0.5
INTRO = (
    "**Sensitivity** — each square is a removable unit, laid out like the toggles below; colour is how "
    "much the teacher's prediction (noise or v) changes when that unit alone is removed (relative MSE, log "
    "scale: pale is nearly free, dark red hurts). Hatched units cannot be removed on their own; hover "
    "for why. **Auto-prune** ticks the least damaging units that meet the budget."
)


# ------------------------------------------------------------------ the heatmap (plain data)


def heat_layout(store: Store, name: str) -> plots.HeatLayout:
    return store.memo(("heat-layout", name), lambda: plots.heat_layout(store.catalog(name)))


def heat_figure(store: Store, name: str, smap: sensitivity.SensitivityMap) -> dict[str, Any]:
    """The heatmap of a map over the base's units."""
    return plots.sensitivity_figure(
        heat_layout(store, name), sensitivity.heat_rows(smap, store.catalog(name))
    )


def map_md(smap: sensitivity.SensitivityMap) -> str:
    """One line on where the map comes from and what it covers."""
    scored = [u for u in smap.units.values() if u.scored]
    blocked = len(smap.units) - len(scored)
    s = smap.settings
    how = (
        f"{s.get('prompts', '?')} prompts, {s.get('timesteps', '?')} of {s.get('steps', '?')} sampling steps, "
        f"{smap.samples} recorded UNet inputs"
    )
    where = "from the cache" if smap.from_cache else f"measured in {smap.seconds:.0f} s"
    ranked = smap.ranked()
    extremes = (
        f" Least harmful: {fmt.escape(ranked[0].unit)} ({ranked[0].deviation:.2g}); most: "
        f"{fmt.escape(ranked[-1].unit)} ({ranked[-1].deviation:.2g})."
        if ranked
        else ""
    )
    fidelity = (
        " With the toy checker's fidelity and full-prompt drops." if smap.teacher_fidelity is not None else ""
    )
    return (
        f"<span class='wb-muted'>Sensitivity of {fmt.escape(smap.base)}: {len(scored)} units scored"
        f"{f', {blocked} cannot be removed (hatched)' if blocked else ''}; {how}; {where}.{fidelity}"
        f"{extremes}</span>"
    )


def missing_md(store: Store, name: str) -> str:
    base = store.base(name)
    if not base.has_pipeline:
        return (
            f"<span class='wb-muted'>No sensitivity map for {fmt.escape(name)}: measuring runs the teacher on "
            "real prompts, so it needs a pipeline with weights (load the toy, a pipeline folder or a hub id). "
            "Auto-prune needs the map too.</span>"
        )
    return (
        f"<span class='wb-muted'>No sensitivity map for {fmt.escape(name)} yet: press *Measure sensitivity* "
        "(one student per unit; cached on disk after), or *Auto-prune*, which measures it first.</span>"
    )


def heat_outputs(store: Store, name: str, smap: sensitivity.SensitivityMap | None) -> tuple:
    """(heatmap plot update, note) for a map, or a hidden plot and what to do when there is none."""
    if smap is None:
        return gr.update(value=None, visible=False), missing_md(store, name)
    return gr.update(value=plot(heat_figure(store, name, smap)), visible=True), map_md(smap)


def cached(store: Store, name: str) -> sensitivity.SensitivityMap | None:
    """The map measured earlier for this base with the store's calibration; never measures."""
    return sensitivity.cached_map(store.base(name), store.calibration)


# ------------------------------------------------------------------ handlers (plain functions)


def show_cached(store: Store, view: dict[str, Any]) -> tuple:
    """A base is shown: its cached heatmap, or a line saying how to get one."""
    name = view["base"]
    try:
        return heat_outputs(store, name, cached(store, name))
    except WorkbenchError as err:  # e.g. a base that no longer resolves; the model box says more
        return gr.update(value=None, visible=False), fmt.error_md(str(err), "No sensitivity map")


def measure_sensitivity(store: Store, view: dict[str, Any], fidelity: bool, progress: Any = None) -> tuple:
    """Measure (or read from the cache) the base's map: (heatmap update, note)."""
    name = view["base"]
    base = store.base(name)
    if fidelity and base.kind != "toy":
        raise WorkbenchError(
            f"the fidelity drop needs the toy's prompt checker, which {name!r} has none of; untick fidelity"
        )
    smap = _map(store, name, bool(fidelity), progress, 0.0, 1.0)
    return heat_outputs(store, name, smap)


def _map(
    store: Store, name: str, fidelity: bool, progress: Any, lo: float, hi: float
) -> sensitivity.SensitivityMap:
    """The cached map if it has what is asked; else measured on the store's probe."""
    base = store.base(name)
    have = cached(store, name)
    if have is not None and (have.has_fidelity or not fidelity):
        return have
    mid = lo + 0.1 * (hi - lo)
    probe = store.probe(name, _adapter(progress, lo, mid))  # raises for a base without a pipeline
    return sensitivity.sensitivity(
        base, store.calibration, fidelity=fidelity, probe=probe, progress=_adapter(progress, mid, hi)
    )


def _adapter(progress: Any, lo: float, hi: float) -> Progress | None:
    """A core progress callback driving a gr.Progress bar over [lo, hi] (None: no bar)."""
    return ProgressAdapter(progress, lo, hi) if progress is not None else None


def keep_fraction(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"keep fraction {value!r} is not a number; give e.g. 0.5 for half") from None


def make_budget(
    store: Store, view: dict[str, Any], kind: str, fraction: float, device: str, dtype: str
) -> autoprune.Budget:
    """The budget at the view's resolution, from data the store already holds (FLOPs, profile)."""
    name, px = view["base"], int(view["resolution"])
    catalog = store.catalog(name)
    if kind == "flops":
        pricing = store.pricing(name, px)

        def at(d: int) -> dict[str, float]:  # only after a whole-stage removal
            return {a: float(n) for a, n in (pricing.at(d) if d else pricing.atom_flops).items()}

        return autoprune.Budget("flops", fraction, at(0), at)
    if kind == "latency":
        profile = plan_view.cached_profile(store, view, device, dtype)
        if profile is None:
            raise WorkbenchError(
                f"a latency budget needs this machine's latency profile at {px} px ({device}, {dtype}): "
                "press Profile under 'Resolution and latency' first, or choose a params or FLOPs budget"
            )
        return autoprune.budget("latency", fraction, catalog, profile=profile)
    return autoprune.budget(kind, fraction, catalog)


@dataclass(frozen=True)
class Pruned:
    """What an auto-prune found, for the summary line."""

    result: autoprune.Result
    budget: autoprune.Budget


def run_autoprune(
    store: Store,
    view: dict[str, Any],
    kind: str,
    fraction: Any,
    method: str,
    device: str,
    dtype: str,
    progress: Any = None,
) -> tuple[Pruned, sensitivity.SensitivityMap]:
    """``autoprune.autoprune`` on what the store holds: its budget (FLOPs, profile), its
    calibration and its probe (the loaded teacher, kept for the next run)."""
    name = view["base"]
    budget = make_budget(store, view, kind, keep_fraction(fraction), device, dtype)
    result, _ = autoprune.autoprune(
        store.base(name), {kind: budget.target}, method=method, settings=store.calibration, name="auto",
        budgets=[budget], probe=lambda p: store.probe(name, p), progress=_adapter(progress, 0.0, 1.0),
    )  # fmt: skip
    return Pruned(result, budget), result.sensitivity_map


def summary_md(pruned: Pruned) -> str:
    """One line: kept fraction, params, measured deviation, evaluations."""
    result, budget = pruned.result, pruned.budget
    spec = result.spec
    kept = budget.fraction(spec)
    parts = [
        f"**Auto-pruned** ({result.method}): keeps {100 * kept:.1f} % of the teacher's {BUDGET_WORDS[budget.kind]} "
        f"(target ≤ {100 * budget.target:.0f} %)",
        f"{fmt.params(spec.student_params)} of {fmt.params(spec.teacher_params)} params "
        f"({fmt.percent(spec.student_params, spec.teacher_params)})",
    ]
    if result.deviation is not None:
        parts.append(f"measured deviation {result.deviation:.3g}")
    else:
        parts.append(f"deviation not measured (sum of lone scores {result.estimated_cost:.3g})")
    parts.append(f"{result.evaluations} evaluation{'s' * (result.evaluations != 1)}")
    auto = f" (+{len(spec.auto_removed)} automatically)" if spec.auto_removed else ""
    parts.append(f"{len(spec.plan.removed)} unit{'s' * (len(spec.plan.removed) != 1)} ticked{auto}")
    return " · ".join(parts) + "."


def auto_prune(
    store: Store,
    view: dict[str, Any],
    kind: str,
    fraction: Any,
    method: str,
    device: str,
    dtype: str,
    progress: Any = None,
) -> tuple:
    """Auto-prune and put the plan on the toggles: (view, plan, summary, heatmap, note, *panel)."""
    pruned, smap = run_autoprune(store, view, kind, fraction, method, device, dtype, progress)
    removed = sorted(pruned.result.spec.plan.removed, key=natural_key)
    new = plan_view.next_view(view, removed=removed)
    return (
        new,
        removed,
        summary_md(pruned),
        *heat_outputs(store, view["base"], smap),
        *panel_updates(store, new, removed, device, dtype),
    )


def slider_label(kind: str) -> str:
    return f"Keep fraction of {BUDGET_WORDS.get(kind, kind)}"


# ------------------------------------------------------------------ layout and wiring


@dataclass
class Parts:
    heat: gr.Plot
    note: gr.Markdown
    fidelity: gr.Checkbox
    measure: gr.Button
    keep: gr.Slider
    kind: gr.Dropdown
    method: gr.Dropdown
    run: gr.Button
    summary: gr.Markdown


def build(ctx: Shared) -> Parts:
    """The heatmap and the auto-prune controls (wired by ``wire`` once the panel exists)."""
    with gr.Accordion("Sensitivity and auto-prune", open=True, elem_id="wb-sensitivity"):
        gr.Markdown(INTRO)
        heat = gr.Plot(show_label=False, elem_id="wb-heat", visible=False)
        note = gr.Markdown(elem_id="wb-heat-note")
        with gr.Row(equal_height=True):
            fidelity = gr.Checkbox(
                value=False, label="with fidelity drops (toy only, slower)", scale=2, min_width=160
            )
            measure = gr.Button("Measure sensitivity", size="sm", scale=1, min_width=160)
        keep = gr.Slider(0.05, 1.0, value=DEFAULT_KEEP, step=0.01, label=slider_label("params"))
        with gr.Row(equal_height=False):  # below the slider, so that each choice shows whole
            kind = gr.Dropdown(
                [("params", "params"), ("FLOPs", "flops"), ("latency (profiled)", "latency")],
                value="params",
                label="Budget",
                scale=2,
                min_width=170,
                elem_id="wb-autoprune-budget",
            )
            method = gr.Dropdown(
                METHOD_CHOICES,
                value="static",
                label="Search",
                scale=3,
                min_width=280,
                elem_id="wb-autoprune-search",
            )
        run = gr.Button("Auto-prune", variant="primary", size="sm")
        summary = gr.Markdown(elem_id="wb-autoprune")
    return Parts(heat, note, fidelity, measure, keep, kind, method, run, summary)


def wire(ctx: Shared, parts: Parts) -> None:
    store = ctx.store
    private = {"api_visibility": "private"}

    def on_show(view):
        return show_cached(store, view)

    @inline_errors(n_outputs=2, status_at=1)
    def on_measure(view, fidelity, progress=gr.Progress()):
        return measure_sensitivity(store, view, fidelity, progress)

    n_out = 5 + len(ctx.panel)

    @inline_errors(n_outputs=n_out, status_at=2)
    def on_autoprune(view, kind, keep, method, device, dtype, progress=gr.Progress()):
        return auto_prune(store, view, kind, keep, method, device, dtype, progress)

    heat_out = [parts.heat, parts.note]
    ctx.demo.load(on_show, [ctx.view], heat_out, **private)
    ctx.view.change(on_show, [ctx.view], heat_out, **private)  # another model, or a new plan
    parts.kind.change(lambda k: gr.update(label=slider_label(k)), [parts.kind], [parts.keep], **private)
    parts.measure.click(
        on_measure, [ctx.view, parts.fidelity], heat_out, api_visibility="private", **ctx.model_event()
    )
    parts.run.click(
        on_autoprune,
        [ctx.view, parts.kind, parts.keep, parts.method, *ctx.panel_inputs()],
        [ctx.view, ctx.plan, parts.summary, *heat_out, *ctx.panel],
        api_visibility="private",
        **ctx.model_event(),
    )
