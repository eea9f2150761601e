"""Sensitivity maps and auto-prune on a real tiny SDXL-topology pipeline."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from workbench import autoprune as ap
from workbench import sensitivity as sens
from workbench.catalog import build_catalog
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.models import load_unet, resolve_base
from workbench.surgery import build_student
from workbench.testing import FAST_CALIBRATION

CALIBRATION = dataclasses.replace(FAST_CALIBRATION, guidance=3.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(perturbed_pipeline):
    return perturbed_pipeline


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def probe(base):
    return sens.Probe(base, CALIBRATION)


@pytest.fixture(scope="module")
def smap(base, probe, cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE_DIR", str(cache))
        return sens.sensitivity(base, CALIBRATION, probe=probe)


def test_recorded_steps_span_the_schedule():
    assert sens.recorded_steps(20, 4) == [0, 6, 13, 19]
    assert sens.recorded_steps(4, 1) == [2]
    with pytest.raises(WorkbenchError, match="cannot exceed the sampling steps"):
        sens.Calibration(steps=3, timesteps=4).check()


def test_removing_nothing_costs_exactly_zero(probe, smap):
    assert probe.deviation(()) == 0.0
    assert smap.baseline_deviation == 0.0
    # the calibration covers both guidance halves of every prompt at every recorded step
    assert len(probe.calls) == 2 and probe.samples == 2 * 2 * 2


def test_every_removable_unit_gets_a_finite_positive_score(smap, base):
    catalog = build_catalog(resolve_base(base).unet_config)
    assert list(smap.units) == [u.id for u in catalog.units]
    unscored = [u for u in smap.units.values() if not u.scored]
    for u in smap.units.values():
        if u.scored:
            assert math.isfinite(u.deviation) and u.deviation > 0, u
            assert u.removed_params >= u.params
        else:  # only what diffusers forbids, and the map says why
            assert "input channels" in u.reason or "can only lose" in u.reason, u.reason
    # up layers cannot go alone: they are scored together with a mirrored down layer
    up = smap.units["up_blocks.1.layers.0"]
    assert up.scored and up.companion and up.companion.startswith("down_blocks.1.layers.")
    assert len([u for u in unscored if u.kind != "stage"]) < 5
    # the innermost stage (16 channels, like its neighbour) goes whole; the others change widths
    assert smap.units["down_blocks.2"].scored
    assert {u.unit for u in unscored if u.kind == "stage"} == {"down_blocks.0", "down_blocks.1"}
    assert smap.fidelity_drop("down_blocks.0.layers.0") is None  # not the toy: no checker


def test_a_score_is_the_measured_deviation_of_that_students_output(base, smap, probe):
    """Recompute one score by hand: build the student, run the recorded calls."""
    unit = smap.units["down_blocks.1.attentions"]
    teacher = load_unet(base)
    plan = probe.spec(unit.removed).plan
    student, _ = build_student(teacher, plan)
    err = ref = 0.0
    with torch.no_grad():
        for args, kwargs, target in probe.calls:
            out = student(*args, **kwargs)[0]
            err += float((out - target).pow(2).sum())
            ref += float(target.pow(2).sum())
    assert unit.deviation == pytest.approx(err / ref, rel=1e-5)


def test_the_map_is_cached_and_a_hit_does_not_measure(base, smap, cache, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(cache))
    assert not smap.from_cache and smap.path
    hit = sens.sensitivity(base, CALIBRATION)  # no probe: a miss would load and measure
    assert hit.from_cache
    assert {k: v.deviation for k, v in hit.units.items()} == {k: v.deviation for k, v in smap.units.items()}
    assert sens.cached_map(base, CALIBRATION) is not None
    other = sens.Calibration(prompts=3, steps=4, timesteps=2)
    assert sens.cached_map(base, other) is None  # another calibration is another map
    path = sens.map_path(resolve_base(base), CALIBRATION, "cpu")
    good = path.read_text()
    path.write_text("{not json")
    assert sens.cached_map(base, CALIBRATION) is None  # a corrupt cache is a miss, not a crash
    path.write_text(good)


def test_fidelity_is_refused_without_a_checker(base):
    with pytest.raises(WorkbenchError, match="checker"):
        sens.sensitivity(base, CALIBRATION, fidelity=True)


def test_checker_drops_fidelity_and_full_prompt(base, probe, smap):
    """The toy checker's path on two units: fidelity and full-prompt accuracy, teacher and students."""
    fast = dataclasses.replace(CALIBRATION, fidelity_prompts=3, fidelity_steps=3)
    checked = sens.Probe(base, fast, pipe=probe.pipe)
    small = copy.deepcopy(smap)
    keep = [u for u in small.units if small.units[u].scored][:2]
    small.units = {u: small.units[u] for u in keep}
    assert not small.has_fidelity
    sens._measure_fidelity(checked, small, None)
    assert small.has_fidelity
    assert 0 <= small.teacher_full <= small.teacher_fidelity <= 1  # full needs colour and shape too
    for unit in keep:
        score = small.units[unit]
        assert 0 <= score.full <= score.fidelity <= 1
        assert small.full_drop(unit) == pytest.approx(small.teacher_full - score.full)
        assert small.fidelity_drop(unit) == pytest.approx(small.teacher_fidelity - score.fidelity)
    # the empty plan's student is the teacher: the same images, the same verdicts
    assert checked.accuracy((), 3, 3) == checked.accuracy(None, 3, 3)
    again = sens.SensitivityMap.from_dict(json.loads(json.dumps(small.to_dict())))
    assert again.units == small.units and again.teacher_full == small.teacher_full
    rows = sens.heat_rows(small, checked.catalog)
    assert [r["full_drop"] for r in rows] == [small.full_drop(u) for u in keep]


def test_weightless_bases_are_refused():
    with pytest.raises(WorkbenchError, match="no pipeline"):
        sens.Probe("sdxl-base")


# --------------------------------------------------------------------------- auto-prune


def _params_budget(base, target):
    catalog = build_catalog(resolve_base(base).unet_config)
    return catalog, ap.budget("params", target, catalog)


@pytest.mark.parametrize("method", ["static", "rescored"])
def test_autoprune_meets_the_budget_with_a_buildable_plan(base, smap, probe, method):
    catalog, budget = _params_budget(base, 0.6)
    result = ap.search(catalog, [budget], smap, method=method, probe=probe, candidates=3)
    spec = result.spec
    assert spec.student_params <= 0.6 * spec.teacher_params
    # A plan that meets the budget by much more than one unit's worth would be wasteful.
    assert spec.student_params >= 0.6 * spec.teacher_params - max(u.params for u in catalog.units)
    student, _ = build_student(load_unet(base), spec.plan)
    assert sum(p.numel() for p in student.parameters()) == spec.student_params
    if method == "rescored":
        assert result.deviation == pytest.approx(probe.deviation(spec.plan.removed))
        assert result.evaluations > 0
    else:
        assert result.deviation is None and result.evaluations == 0


def test_rescored_is_no_worse_than_static_on_the_tiny_model(base, smap, probe):
    catalog, budget = _params_budget(base, 0.5)
    static = ap.search(catalog, [budget], smap, method="static")
    rescored = ap.search(catalog, [budget], smap, method="rescored", probe=probe, candidates=4)
    assert rescored.deviation <= probe.deviation(static.spec.plan.removed) + 1e-9


def test_two_budgets_are_both_met(base, smap):
    catalog = build_catalog(resolve_base(base).unet_config)
    budgets = [ap.budget("params", 0.7, catalog), ap.budget("flops", 0.6, catalog, resolution=64)]
    spec = ap.search(catalog, budgets, smap, method="static").spec
    assert all(b.met(spec) for b in budgets)


def test_an_infeasible_budget_names_the_smallest_reachable_size(base, smap):
    catalog, budget = _params_budget(base, 0.01)
    floor = ap.smallest_reachable(catalog)
    with pytest.raises(WorkbenchError) as err:
        ap.search(catalog, [budget], smap, method="static")
    reach = floor.student_params / floor.teacher_params
    assert f"{reach:.3f}" in str(err.value) and f"{floor.student_params:,}" in str(err.value)
    flops = ap.budget("flops", 0.01, catalog, resolution=64)
    floor_flops = ap.smallest_reachable(catalog, flops)
    assert flops.fraction(floor_flops) <= flops.fraction(floor)
    with pytest.raises(WorkbenchError, match=r"a flops budget of 0.01 \(--target-flops\) cannot be met"):
        ap.search(catalog, [flops], smap, method="static")
    # and that floor really is a valid, buildable student
    student, _ = build_student(load_unet(base), floor.plan)
    assert sum(p.numel() for p in student.parameters()) == floor.student_params


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_budget_fractions_are_checked(base, bad):
    catalog = build_catalog(resolve_base(base).unet_config)
    with pytest.raises(WorkbenchError, match=r"fraction of the teacher in \(0, 1\]"):
        ap.budget("params", bad, catalog)


def test_cli_sensitivity_and_autoprune(base, smap, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("WORKBENCH_PRESETS_DIR", str(tmp_path / "presets"))
    fast = ["--prompts", "2", "--steps", "4", "--timesteps", "2", "--guidance", "3"]
    assert main(["sensitivity", "--base", base, *fast, "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["from_cache"], (data["path"], smap.path)
    assert data["units"]["down_blocks.0.layers.0"]["deviation"] > 0

    code = main(["autoprune", "--base", base, *fast, "--target-params", "0.5", "--method", "static",
                 "--save-preset", "tiny-half", "--json", "--quiet"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["student_params"] <= 0.5 * out["teacher_params"]
    saved = json.loads((tmp_path / "presets" / "tiny-half.json").read_text())
    assert saved["name"] == "tiny-half" and saved["removed"] == out["plan"]["removed"]

    assert main(["autoprune", "--base", base, *fast, "--target-params", "0.01"]) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert main(["autoprune", "--base", base]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert main(["sensitivity", "--base", base, "--timesteps", "9", "--steps", "4"]) == 2
    assert "cannot exceed" in capsys.readouterr().err
