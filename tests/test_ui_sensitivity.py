"""The Blocks tab's sensitivity heatmap and auto-prune slider, called as plain handlers.

A real tiny SDXL-topology pipeline (perturbed weights, so every unit matters) measured with
small calibration settings; SDXL's real config (meta device, no weights) for layouts and
the errors a weightless base gets.
"""

from __future__ import annotations

import json
import math

import gradio as gr
import pytest

from workbench import autoprune
from workbench import sensitivity as sens
from workbench.errors import WorkbenchError
from workbench.testing import FAST_CALIBRATION
from workbench.ui import blocks_tab, plan_view, plots
from workbench.ui import sensitivity_panel as sp
from workbench.ui.shared import user_errors
from workbench.ui.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Sensitivity maps (and latency profiles) go to a fresh folder, shared by this module."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("workbench-cache")
        mp.setenv("WORKBENCH_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def pipeline_dir(perturbed_pipeline) -> str:
    return perturbed_pipeline


@pytest.fixture(scope="module")
def store() -> Store:
    return Store(calibration=FAST_CALIBRATION)


@pytest.fixture(scope="module")
def view(pipeline_dir) -> dict:
    return plan_view.new_view(pipeline_dir, 64)


@pytest.fixture(scope="module")
def measured(store, view) -> tuple:
    """The Measure button once for the module (~30 s: one student per unit)."""
    return sp.measure_sensitivity(store, view, False)


def figure_of(update: dict) -> dict:
    assert update["visible"] is True
    return json.loads(update["value"].plot)


def cells(fig: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(unit -> colour value, unit -> hover) for every drawn cell, scored or hatched."""
    heat, blocked = fig["data"]
    colours, hovers = {}, {}
    for z_row, h_row in zip(heat["z"], heat["hovertext"], strict=True):
        for z, h in zip(z_row, h_row, strict=True):
            if z is not None:
                unit = h.split("</b>")[0].removeprefix("<b>")
                colours[unit], hovers[unit] = z, h
    for h in blocked["hovertext"]:
        unit = h.split("</b>")[0].removeprefix("<b>")
        assert unit not in hovers
        hovers[unit] = h
    return colours, hovers


# ------------------------------------------------------------------ the heatmap


def test_heat_layout_gives_every_sdxl_unit_its_own_cell_in_forward_order():
    catalog = Store().catalog("sdxl-base")
    layout = plots.heat_layout(catalog)
    assert set(layout.cells) == {u.id for u in catalog.units}
    assert len(set(layout.cells.values())) == len(catalog.units) == 94  # 91 + 3 whole stages
    assert layout.row_labels[:2] == ("down 0 · whole stage", "down 0 · layer 0")
    assert layout.row_labels[-1] == "up 2 · layer 2"
    mid = [label for label in layout.row_labels if label.startswith("mid")]
    assert mid == ["mid · whole block", "mid · attention"]
    assert layout.cells["down_blocks.2.attentions.1.transformer_blocks.9"] == (
        layout.row_labels.index("down 2 · layer 1"),
        10,
    )
    assert layout.col_labels[:3] == ("unit", "block 0", "block 1")


def test_measured_heatmap_has_one_cell_per_unit_with_finite_colour(store, view, measured):
    import plotly.graph_objects as go

    heat, note = measured
    fig = figure_of(heat)
    go.Figure(fig)  # raises on any property plotly.js does not know
    smap = sens.cached_map(view["base"], FAST_CALIBRATION)
    assert smap is not None
    catalog = store.catalog(view["base"])
    colours, hovers = cells(fig)
    assert set(hovers) == {u.id for u in catalog.units}  # one cell per unit, none hidden
    scored = {u.unit for u in smap.units.values() if u.scored}
    assert set(colours) == scored
    for unit in scored:
        assert math.isfinite(colours[unit])
        assert colours[unit] == pytest.approx(math.log10(smap.units[unit].deviation))
        assert f"{smap.units[unit].deviation:.3g}" in hovers[unit]
    # units no plan can remove are hatched grey, with the reason on hover
    blocked = [u for u in smap.units.values() if not u.scored]
    assert blocked and fig["data"][1]["marker"]["pattern"]["shape"] == "/"
    for u in blocked:
        assert f"cannot be removed: {u.reason}" in hovers[u.unit].replace("<br>", " ")
    # an up layer goes only with a mirrored down layer: the hover names it
    up = smap.units["up_blocks.1.layers.0"]
    assert up.companion and f"with {up.companion}" in hovers["up_blocks.1.layers.0"]
    # the colour scale is logarithmic: its ticks are decades
    heat_trace = fig["data"][0]
    assert heat_trace["colorbar"]["ticktext"][0].startswith("1e-")
    # low deviation is light, high is dark (plotly.js's named "YlOrRd" would run the other way)
    scale = heat_trace["colorscale"]
    assert scale[0] == [0.0, "#ffffcc"] and scale[-1] == [1.0, "#800026"]
    assert f"{len(scored)} units scored" in note and "measured in" in note


def test_a_cached_map_is_shown_without_measuring_or_loading(pipeline_dir, view, measured):
    fresh = Store(calibration=FAST_CALIBRATION)  # another process, say: nothing in memory
    heat, note = sp.show_cached(fresh, view)
    assert figure_of(heat)["data"][0]["z"] == figure_of(measured[0])["data"][0]["z"]
    assert "from the cache" in note
    heat, note = sp.measure_sensitivity(fresh, view, False)  # the button: a cache hit, instantly
    assert figure_of(heat) and "from the cache" in note
    assert not fresh.is_loaded(pipeline_dir)
    other = Store(calibration=sens.Calibration(prompts=3, steps=4, timesteps=2))  # another calibration
    heat, note = sp.show_cached(other, view)
    assert heat["visible"] is False and "No sensitivity map" in note and "Measure sensitivity" in note


def test_a_base_without_a_pipeline_gets_a_clear_message(store):
    sdxl = plan_view.new_view("sdxl-base", 1024)
    heat, note = sp.show_cached(store, sdxl)
    assert heat["visible"] is False and "needs a pipeline" in note
    with pytest.raises(WorkbenchError, match="has no pipeline with trained weights"):
        sp.measure_sensitivity(store, sdxl, False)
    with pytest.warns(UserWarning, match="has no pipeline"):  # as the button shows it: a toast
        assert user_errors(sp.measure_sensitivity)(store, sdxl, False) == gr.skip()
    with pytest.raises(WorkbenchError, match="has no pipeline"):  # a feasible budget reaches the probe
        sp.auto_prune(store, sdxl, "params", 0.5, "static", "cpu", "bf16")
    assert not store.is_loaded("sdxl-base")


def test_fidelity_is_refused_without_the_toy_checker(store, view):
    with pytest.raises(WorkbenchError, match="toy's prompt checker"):
        sp.measure_sensitivity(store, view, True)


# ------------------------------------------------------------------ auto-prune


def test_autoprune_puts_a_plan_meeting_the_budget_on_the_toggles(store, view, measured):
    new, plan, summary, heat, note, numbers, notes, arch, bars = sp.auto_prune(
        store, view, "params", 0.5, "static", "cpu", "bf16"
    )
    spec = store.spec(view["base"], plan)
    assert plan and new["removed"] == plan and new["rev"] == view["rev"] + 1  # the toggles redraw
    assert spec.student_params <= 0.5 * spec.teacher_params
    # the plan is what the toggles hold: every id is a checkbox, and ticking them gives the same panel
    ids = {
        uid for s in blocks_tab.cached_board(store, new["base"], 64) for r in s.rows for _, uid in r.choices
    }
    assert set(plan) <= ids
    assert blocks_tab.on_toggle(store, new, "cpu", "bf16", plan)[1:3] == (numbers, notes)
    kept = f"{100 * spec.student_params / spec.teacher_params:.1f} %"
    assert f"keeps {kept} of the teacher's parameters" in summary and "0 evaluations" in summary
    assert figure_of(heat) and "units scored" in note


def test_rescored_autoprune_measures_its_plan_and_keeps_the_probe(store, view, measured):
    _, plan, summary, *_ = sp.auto_prune(store, view, "params", 0.9, "rescored", "cpu", "bf16")
    probe = store.probe(view["base"])
    spec = store.spec(view["base"], plan)
    assert spec.student_params <= 0.9 * spec.teacher_params
    deviation = probe.deviation(plan)
    assert f"measured deviation {deviation:.3g}" in summary and "evaluations" in summary
    sp.auto_prune(store, view, "params", 0.9, "rescored", "cpu", "bf16")
    assert store.probe(view["base"]) is probe  # no reload, no re-recording


def test_flops_budget_counts_flops_at_the_views_resolution(store, view, measured):
    _, plan, summary, *_ = sp.auto_prune(store, view, "flops", 0.7, "static", "cpu", "bf16")
    pricing = store.pricing(view["base"], 64)
    spec = store.spec(view["base"], plan)
    assert pricing.student_flops(spec) <= 0.7 * pricing.teacher_flops
    assert "of the teacher's FLOPs" in summary


def test_infeasible_budget_names_the_smallest_reachable_fraction(store, view):
    catalog = store.catalog(view["base"])
    floor = autoprune.smallest_reachable(catalog)
    reach = floor.student_params / floor.teacher_params
    with pytest.raises(WorkbenchError, match="cannot be met") as info:
        sp.auto_prune(store, view, "params", 0.01, "static", "cpu", "bf16")
    assert f"keeps {reach:.3f} of its params" in str(info.value)
    assert f"at least {math.ceil(reach * 1000) / 1000:.3f}" in str(info.value)
    sdxl = plan_view.new_view("sdxl-base", 1024)  # checked before any weights: a config is enough
    with pytest.raises(WorkbenchError, match="cannot be met"):
        sp.auto_prune(store, sdxl, "params", 0.01, "rescored", "cpu", "bf16")


def test_latency_budget_asks_for_a_profile_first(store, view):
    with pytest.raises(WorkbenchError, match="press Profile"):
        sp.auto_prune(store, view, "latency", 0.5, "static", "cpu", "fp32")


def test_the_blocks_tab_shows_the_heatmap_and_the_slider():
    from workbench.ui.app import build_app
    from workbench.ui.settings import AppSettings

    demo = build_app(AppSettings(base="sdxl-base"), store=Store())
    blocks = list(demo.blocks.values())
    assert any(isinstance(b, gr.Plot) and b.elem_id == "wb-heat" for b in blocks)
    slider = next(b for b in blocks if isinstance(b, gr.Slider) and b.label == sp.slider_label("params"))
    assert (slider.minimum, slider.maximum, slider.value) == (0.05, 1.0, 0.5)
    assert any(isinstance(b, gr.Button) and b.value == "Auto-prune" for b in blocks)
    assert any(isinstance(b, gr.Button) and b.value == "Measure sensitivity" for b in blocks)
