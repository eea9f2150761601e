"""The Export tab's handlers as plain functions: formats, the LoRA report, trained runs."""

from __future__ import annotations

import zipfile

import pytest

from workbench import presets
from workbench.errors import WorkbenchError
from workbench.runs import MetricsWriter, RunDir, write_json_atomic
from workbench.surgery import build_student, save_student
from workbench.testing import teacher_lora
from workbench.ui import export_tab, plan_view

SSD_1B = list(presets.load_preset("ssd-1b").removed)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, perturbed_pipeline) -> str:
    return str(teacher_lora(perturbed_pipeline, tmp_path_factory.mktemp("lora")))


def _names(archive: str) -> set[str]:
    with zipfile.ZipFile(archive) as z:
        return {n.split("/", 1)[1] for n in z.namelist() if not n.endswith("/")}


@pytest.mark.slow
def test_formats_say_which_clients_read_the_plan(store):
    view = plan_view.new_view("sdxl-base", 1024)
    text = export_tab.formats_md(store, view, SSD_1B)
    assert "published **SSD-1B** structure" in text and "ComfyUI recognises the structure" in text
    text = export_tab.formats_md(store, view, ["down_blocks.2.attentions.0.transformer_blocks.9"])
    assert "no published structure" in text and "needs a custom loader" in text
    assert "pipeline and checkpoint formats need a teacher with a full pipeline" in text
    assert "at least one layer" in export_tab.formats_md(
        store, view, ["down_blocks.0.layers.0", "down_blocks.0.layers.1"]
    )


def test_lora_report_for_the_current_plan(store, perturbed_pipeline, lora_file):
    view = plan_view.new_view(perturbed_pipeline, 64)
    text = export_tab.lora_md(store, view, SSD_1B, lora_file)
    assert "32 pairs would land on the wrong module" in text and "renamed" in text and "surviving" in text
    assert export_tab.lora_md(store, view, SSD_1B, None) == ""


@pytest.mark.slow
def test_pipeline_export_with_the_remapped_lora(store, perturbed_pipeline, lora_file):
    view = plan_view.new_view(perturbed_pipeline, 64)
    archive, summary = export_tab.export_student(store, view, SSD_1B, "pipeline", "auto", lora_file=lora_file)
    names = _names(archive)
    assert {
        "model_index.json",
        "README.md",
        "unet/layer_map.json",
        "lora/pytorch_lora_weights.safetensors",
    } <= names
    assert "full pipeline folder, fp32" in summary and "DiffusionPipeline.from_pretrained" in summary
    assert "**LoRA** (remapped into `lora/`)" in summary


def test_single_file_export_names_the_clients(store, perturbed_pipeline):
    view = plan_view.new_view(perturbed_pipeline, 64)
    archive, summary = export_tab.export_student(store, view, SSD_1B, "single-file", "bf16")
    assert any(n.endswith(".safetensors") for n in _names(archive)) and "bf16" in summary
    assert "Single-file clients" in summary and "from_single_file" in summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory, store, perturbed_pipeline):
    """A runs folder with one finished run (job.json, metrics, student/) and one without a student."""
    root = tmp_path_factory.mktemp("runs")
    plan = presets.load_preset("koala-700m")
    student, spec = build_student(store.teacher_unet(perturbed_pipeline), plan)
    run = RunDir(root / "koala")
    config = {"stages": [plan.to_dict()], "steps": 5, "base": perturbed_pipeline, "data": "toy", "batch_size": 2,
              "grad_accum": 1, "lr": 1e-4, "lr_schedule": "constant", "w_task": 1.0, "w_out": 0.5,
              "w_feat": 0.5, "feature_mode": "layer", "mixed_precision": "no"}  # fmt: skip
    write_json_atomic(run.job, {"config": config})
    write_json_atomic(run.status, {"state": "done", "step": 5})
    writer = MetricsWriter(run)
    writer.write({"step": 4, "loss/total": 0.5})
    writer.close()
    save_student(student, spec, run.student)
    write_json_atomic(root / "unfinished" / "job.json", {"config": config})
    return root, run


def test_a_trained_run_exports_with_its_card(store, runs):
    root, run = runs
    choices = export_tab.source_choices(root)
    assert [value for _, value in choices] == [export_tab.CURRENT_PLAN, str(run.root)]
    view = plan_view.new_view("toy", 64)  # the app shows another model: the run's own teacher is used
    archive, summary = export_tab.export_student(store, view, [], "diffusers", source=str(run.root))
    assert "the trained student" in summary and "student-koala-diffusers.zip" in summary
    with zipfile.ZipFile(archive) as z:
        card = z.read("student-koala-diffusers/README.md").decode()
    assert "5 optimizer steps" in card and run.root.as_posix() not in card


def test_bad_uploads_and_formats_are_refused(store, perturbed_pipeline, tmp_path):
    view = plan_view.new_view(perturbed_pipeline, 64)
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(b"x")
    with pytest.raises(WorkbenchError, match="not a .safetensors file"):
        export_tab.lora_md(store, view, SSD_1B, str(pickled))
    with pytest.raises(WorkbenchError, match="unknown export format"):
        export_tab.export_student(store, view, SSD_1B, "onnx")
    with pytest.raises(WorkbenchError, match="needs the teacher's VAE"):
        export_tab.export_student(store, plan_view.new_view("sdxl-base", 1024), SSD_1B, "checkpoint")
