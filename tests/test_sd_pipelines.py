"""SD 1.x (epsilon) and SD 2.x (v-prediction) teachers end to end, on tiny real pipelines
(one CLIP text encoder, no added conditioning): distil through the BK-SDM presets (every
feature mode, two stages, resume), sample, Compare, sensitivity, auto-prune, every export
format, and the UI loading such a pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from workbench import autoprune as ap
from workbench import export
from workbench import sensitivity as sens
from workbench.catalog import build_catalog
from workbench.distill import run_distillation
from workbench.models import load_pipeline, load_unet, resolve_base
from workbench.presets import load_preset
from workbench.runs import RunDir, read_metrics
from workbench.sampling import generate
from workbench.surgery import build_student
from workbench.testing import FAST_CALIBRATION, run_config, tiny_sd_pipeline
from workbench.ui import compare_tab, model_box, plan_view, presets_tab
from workbench.ui.settings import Limits
from workbench.ui.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = dataclasses.replace(FAST_CALIBRATION, guidance=3.0)
TINY = list(load_preset("bk-sdm-tiny").removed)


@pytest.fixture(scope="module", params=["1.5", "2.1"])
def sd(request, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp(f"sd{request.param}") / "pipe"
    return str(tiny_sd_pipeline(folder, request.param, perturb=True))


def _config(base, presets=("bk-sdm-tiny",), **changes):
    """Two steps a stage, a checkpoint after each."""
    return run_config(base, steps=2, presets=presets, **({"checkpoint_every": 1} | changes))


def _losses(run_dir):
    rows, _ = read_metrics(Path(run_dir) / "metrics.jsonl")
    return {r["step"]: r["loss/total"] for r in rows}, rows


def test_the_pipelines_are_sd_shaped(sd):
    pipe = load_pipeline(sd)
    assert type(pipe) is StableDiffusionPipeline and not hasattr(pipe, "text_encoder_2")
    assert pipe.unet.config.addition_embed_type is None and len(pipe.unet.config.block_out_channels) == 4
    v = pipe.unet.config.use_linear_projection  # SD 2.1's marker
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if v else "epsilon")


@pytest.mark.slow
def test_distils_through_two_stages_and_resumes_exactly(sd, tmp_path):
    config = _config(sd, presets=("bk-sdm-small", "bk-sdm-tiny"))
    run_distillation(config, tmp_path / "straight")
    reference, rows = _losses(tmp_path / "straight")
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor(list(reference.values()))))
    RunDir(tmp_path / "split").request_stop()  # honoured after the first step
    assert run_distillation(config, tmp_path / "split")["state"] == "stopped"
    assert run_distillation(None, tmp_path / "split", resume=True)["state"] == "done"
    resumed, _ = _losses(tmp_path / "split")
    assert sorted(resumed) == sorted(reference)
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, abs=1e-6), step
    # the student: BK-SDM-Tiny's structure, stock diffusers, in the stock SD pipeline
    run = RunDir(tmp_path / "straight")
    unet, info = UNet2DConditionModel.from_pretrained(run.student, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert unet.config.block_out_channels == [8, 16, 16] and unet.config.mid_block_type is None
    spec = export.student_from_folder(run.student, resolve_base(sd)).spec
    assert sum(p.numel() for p in unet.parameters()) == spec.student_params
    pipe = StableDiffusionPipeline.from_pretrained(sd, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and list(run.samples.glob("step_*.png"))


@pytest.mark.parametrize("mode", ["block", "self-attention", "none"])
def test_every_feature_mode_trains(sd, tmp_path, mode):
    status = run_distillation(_config(sd, feature_mode=mode), tmp_path / "run")
    assert status["state"] == "done"
    _, rows = _losses(tmp_path / "run")
    feats = [k for k in rows[0] if k.startswith("loss/feat/")]
    assert (len(feats) > 0) == (mode != "none")
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)


def test_samples_the_same_noise_through_teacher_and_student(sd):
    pipe = load_pipeline(sd)
    student, _ = build_student(pipe.unet, load_preset("bk-sdm-tiny"))
    one = generate(pipe, ["a red circle"], [3], steps=2, guidance=3.0)
    again = generate(pipe, ["a red circle"], [3], steps=2, guidance=3.0)
    other = generate(pipe, ["a red circle"], [3], steps=2, guidance=3.0, unet=student)
    assert one[0].tobytes() == again[0].tobytes() and one[0].size == other[0].size == (64, 64)
    assert one[0].tobytes() != other[0].tobytes()


def test_a_negative_prompt_without_guidance_steers_the_cross_attention_alone(sd):
    pipe = load_pipeline(sd)  # no pooled text embedding: NASA is the cross-attention only
    kw = {"steps": 2, "guidance": 1.0, "height": 32, "width": 32}
    plain, steered = (
        generate(pipe, ["a red circle"], [0], negative_prompt=n, **kw)[0] for n in (None, "red")
    )
    assert plain.tobytes() != steered.tobytes() and not pipe.unet._forward_pre_hooks


def test_the_ui_loads_applies_bk_sdm_and_compares(sd):
    store = Store()
    view = plan_view.new_view("toy", 64)
    view, plan, status, *_ = model_box.load_model(store, Limits(), sd, view, [], "cpu", "fp32")
    assert view["base"] == sd and plan == [] and "Teacher" in status
    view, plan, status, numbers, *_ = presets_tab.apply_preset(store, view, "bk-sdm-tiny", "cpu", "fp32")
    assert plan == TINY and "bk-sdm-tiny" in status
    form = compare_tab.Form("a red circle", "", "3", 1, 2.0, 32)
    teacher, student, summary = compare_tab.compare(store, Limits(), view, plan, form)
    assert len(teacher) == len(student) == 1 and teacher[0][0].size == student[0][0].size == (
        256,
        256,
    )  # 32 px shown 8x, pixel for pixel
    assert f"{len(TINY)} units removed" in summary


@pytest.mark.slow
def test_sensitivity_and_autoprune(sd, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    probe = sens.Probe(sd, CALIBRATION)
    smap = sens.sensitivity(sd, CALIBRATION, probe=probe)
    catalog = build_catalog(resolve_base(sd).unet_config)
    assert list(smap.units) == [u.id for u in catalog.units]
    for unit in smap.units.values():
        assert (unit.scored and unit.deviation > 0) or unit.reason, unit
    # block_out_channels [8, 16, 16, 16]: the two inner stages can go whole, the outer two not
    assert smap.units["down_blocks.3"].scored and smap.units["down_blocks.2"].scored
    assert "removable alone here: down_blocks.2, down_blocks.3" in smap.units["down_blocks.1"].reason
    result = ap.search(
        catalog, [ap.budget("params", 0.5, catalog)], smap, method="rescored", probe=probe, candidates=2
    )
    assert result.spec.student_params <= 0.5 * result.spec.teacher_params
    student, _ = build_student(load_unet(sd), result.spec.plan)
    assert sum(p.numel() for p in student.parameters()) == result.spec.student_params


def test_exports_every_format(sd, tmp_path):
    base = resolve_base(sd)
    student = export.student_from_plan(base, load_preset("bk-sdm-tiny"))
    pipe = load_pipeline(base)
    results = {
        fmt: export.export(student, fmt, tmp_path / fmt, dtype="fp32", pipeline=pipe)
        for fmt in export.FORMATS
    }
    mine = student.unet.state_dict()

    def same(unet) -> bool:
        theirs = unet.state_dict()
        return set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)

    assert same(UNet2DConditionModel.from_pretrained(results["diffusers"].out))
    folder = StableDiffusionPipeline.from_pretrained(results["pipeline"].out)
    assert (
        same(folder.unet) and folder.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    )
    single = results["single-file"]
    assert same(
        UNet2DConditionModel.from_single_file(str(single.out / single.weights_file), config=str(single.out))
    )
    ckpt = results["checkpoint"]
    loaded = StableDiffusionPipeline.from_single_file(
        str(ckpt.out / ckpt.weights_file), config=str(results["pipeline"].out)
    )
    assert same(loaded.unet)
    for name in ("vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    for result in results.values():
        assert "README.md" in result.files


def test_a_teacher_lora_follows_the_renumbered_stages(sd, tmp_path):
    from workbench import lora
    from workbench.testing import teacher_lora

    base = resolve_base(sd)
    teacher = lora.read_lora(teacher_lora(sd, tmp_path / "lora", text_encoder=False), base)
    spec = export.student_from_plan(base, load_preset("bk-sdm-tiny")).spec
    pairs, report = lora.remap(teacher, spec.layer_map)
    # the teacher's up_blocks.1 is the student's up_blocks.0; up_blocks.0 (removed) drops
    assert ("up_blocks.1.attentions.0.proj_in", "up_blocks.0.attentions.0.proj_in") in report.renamed
    assert all(not n.startswith("up_blocks.0.") or n in report.dropped for n in teacher.unet)
    assert "up_blocks.0.attentions.0.proj_in" in pairs and report.dropped
    pipe = StableDiffusionPipeline.from_pretrained(sd, unet=load_unet(sd))
    pipe.unet, _ = build_student(pipe.unet, load_preset("bk-sdm-tiny"))
    pipe.load_lora_weights(str(lora.save_lora(teacher, pairs, report, tmp_path / "student-lora")))


def test_sampling_through_a_bf16_pipeline_leaves_a_training_student_untouched(sd):
    """Sample grids during a run with a bf16 teacher must not round the fp32 student in place."""
    pipe = load_pipeline(sd).to(dtype=torch.bfloat16)
    student, _ = build_student(load_pipeline(sd).unet, load_preset("bk-sdm-small"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    generate(pipe, ["a red circle"], [0], steps=1, guidance=1.0, unet=student)
    assert student.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
