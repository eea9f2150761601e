"""Export formats: diffusers folder, full pipeline, single-file UNet and full checkpoint,
their model cards, and the original (SGM/LDM) key layout they are written in."""

import json
import os
import re
import stat

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open

from workbench import export, sgm
from workbench.catalog import build_catalog, meta_unet
from workbench.cli import main
from workbench.cost import dummy_inputs
from workbench.errors import WorkbenchError
from workbench.models import TOY_DIR, resolve_base
from workbench.plan import PruningPlan
from workbench.presets import load_preset
from workbench.runs import MetricsWriter, RunDir, write_json_atomic
from workbench.surgery import build_student, save_student, student_spec
from workbench.testing import tiny_sdxl_config, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = ["sdxl-base", "ssd-1b", "segmind-vega", "koala-1b", "koala-700m"]
# Parameters of each preset's student on SDXL's config: all of them get an original key.
SDXL_KEYS = {"sdxl-base": 1680, "ssd-1b": 944, "segmind-vega": 564, "koala-1b": 790, "koala-700m": 584}
PUBLISHED = {
    "sdxl-base": "SDXL",
    "ssd-1b": "SSD-1B",
    "segmind-vega": "Segmind-Vega",
    "koala-1b": "KOALA-1B",
    "koala-700m": "KOALA-700M",
}


@pytest.fixture(scope="module")
def toy():
    return resolve_base("toy")


@pytest.fixture(scope="module")
def toy_students(toy):
    from workbench.models import load_unet

    teacher = load_unet(toy)
    return {name: export.student_from_plan(toy, load_preset(name), teacher) for name in PRESETS}


# ------------------------------------------------------------------ the original key layout


@pytest.mark.parametrize("preset", PRESETS)
def test_every_sdxl_student_key_maps_and_diffusers_reads_it_back(sdxl_config, preset):
    """On SDXL's real config (meta device, no weights): each key of the student gets an original
    name, and diffusers' own original -> diffusers converter gives back exactly the student's keys."""
    spec = student_spec(sdxl_config, load_preset(preset))
    state = meta_unet(spec.config).state_dict()
    original = sgm.unet_to_original(state, spec.config)
    assert len(state) == len(original) == SDXL_KEYS[preset]
    assert all(k.startswith("model.diffusion_model.") for k in original)
    back = convert_ldm_unet_checkpoint(original, spec.config)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


def test_original_indices_follow_the_students_structure(sdxl_config):
    """KOALA-700M keeps one layer per stage and has no mid block: its indices are its own."""
    spec = student_spec(sdxl_config, load_preset("koala-700m"))
    modules = sgm.unet_module_map(spec.config)
    assert modules["down_blocks.1.resnets.0"] == "input_blocks.3.0"  # SDXL: input_blocks.4.0
    assert modules["down_blocks.1.downsamplers.0.conv"] == "input_blocks.4.0.op"  # SDXL: 6
    assert modules["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.2.conv"
    assert not any(v.startswith("middle_block") for v in modules.values())
    assert (
        sgm.unet_key("down_blocks.1.resnets.0.norm1.weight", modules) == "input_blocks.3.0.in_layers.0.weight"
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_published_structures_are_recognised(sdxl_config, preset):
    support = sgm.client_support(student_spec(sdxl_config, load_preset(preset)).config)
    assert support.structure == PUBLISHED[preset] and support.comfyui and support.diffusers
    assert support.a1111 == (preset == "sdxl-base")


def test_other_plans_are_said_to_need_a_custom_loader(sdxl_config):
    catalog = build_catalog(sdxl_config)
    one_block = PruningPlan.empty(catalog, name="x").with_removed(
        ["down_blocks.2.attentions.0.transformer_blocks.9"]
    )
    support = sgm.client_support(student_spec(sdxl_config, one_block).config)
    assert support.structure is None and not support.comfyui and not support.a1111 and support.diffusers
    assert "needs a custom loader" in " ".join(support.lines())
    uneven = PruningPlan.empty(catalog, name="y").with_removed(["down_blocks.1.layers.1"])
    support = sgm.client_support(student_spec(sdxl_config, uneven).config)
    assert not support.diffusers and "diffusers folder" in support.lines()[2]


# ------------------------------------------------------------------ single files round trip


@pytest.mark.parametrize("preset", PRESETS)
def test_single_file_unet_round_trips_bit_identically(toy_students, preset, tmp_path):
    student = toy_students[preset]
    result = export.export(student, "single-file", tmp_path / preset, dtype="fp32")
    loaded = UNet2DConditionModel.from_single_file(
        str(result.out / result.weights_file), config=str(result.out)
    ).eval()
    mine, theirs = student.unet.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    torch.manual_seed(0)
    inputs = dummy_inputs(student.spec.config, 8)
    with torch.no_grad():  # same weights; oneDNN may pick another kernel per allocation (last-bit noise)
        torch.testing.assert_close(student.unet(**inputs).sample, loaded(**inputs).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_single_file_dtype(toy_students, tmp_path, dtype, torch_dtype):
    result = export.export(toy_students["segmind-vega"], "single-file", tmp_path / "s", dtype=dtype)
    with safe_open(str(result.out / result.weights_file), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
        assert f.metadata()["workbench.dtype"] == dtype


def test_sd15_student_round_trips(tiny_sd15_teacher, tmp_path):
    """The layout follows any supported topology: SD 1.x's four stages, attention-free last stage."""
    folder = tmp_path / "sd15"
    tiny_sd15_teacher.save_pretrained(folder)
    base = resolve_base(str(folder))
    plan = PruningPlan.empty(build_catalog(base.unet_config), name="one-layer").with_removed(
        [f"down_blocks.{i}.layers.1" for i in range(4)]
    )
    student = export.student_from_plan(base, plan)
    result = export.export(student, "single-file", tmp_path / "out", dtype="fp32")
    loaded = UNet2DConditionModel.from_single_file(
        str(result.out / result.weights_file), config=str(result.out)
    )
    mine, theirs = student.unet.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


# ------------------------------------------------------------------ pipeline and checkpoint


@pytest.fixture(scope="module")
def vpred_exports(tmp_path_factory, perturbed_pipeline):
    """A v-prediction teacher's SSD-1B student as a pipeline folder and as a full checkpoint."""
    root = tmp_path_factory.mktemp("exports")
    base = resolve_base(perturbed_pipeline)
    student = export.student_from_plan(base, load_preset("ssd-1b"))
    pipe = export.load_pipeline(base)
    folder = export.export(student, "pipeline", root / "pipe", pipeline=pipe)
    checkpoint = export.export(student, "checkpoint", root / "ckpt", dtype="fp32", pipeline=pipe)
    return student, folder, checkpoint


@pytest.mark.slow
def test_pipeline_folder_generates_with_the_stock_class(vpred_exports):
    student, folder, _ = vpred_exports
    pipe = StableDiffusionXLPipeline.from_pretrained(folder.out)
    assert sum(p.numel() for p in pipe.unet.parameters()) == student.spec.student_params
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    assert {"unet/plan.json", "unet/layer_map.json", "README.md"} <= set(folder.files)


@pytest.mark.slow
def test_checkpoint_loads_in_diffusers_bit_identically(vpred_exports):
    _, folder, checkpoint = vpred_exports
    mine = StableDiffusionXLPipeline.from_pretrained(folder.out)
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint.out / checkpoint.weights_file), config=str(folder.out)
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(mine, name).state_dict(), getattr(theirs, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_checkpoint_keys_are_the_sdxl_layout(vpred_exports):
    _, _, checkpoint = vpred_exports
    with safe_open(str(checkpoint.out / checkpoint.weights_file), framework="pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] if "." in k else k for k in keys}
    assert prefixes == {"model", "first_stage_model", "conditioner", "v_pred", "ztsnr"}
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in keys
    assert "first_stage_model.decoder.up.2.upsample.conv.weight" in keys  # decoder stages reversed


def test_vae_with_mid_attention_round_trips():
    """Attention projections are 1x1 convolutions in the original layout; diffusers reads them back."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)  # fmt: skip
    state = vae.state_dict()
    original = sgm.vae_to_original(state, vae.config)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    back = convert_ldm_vae_checkpoint(original, vae.config)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


# ------------------------------------------------------------------ files: card, paths, permissions


@pytest.mark.slow
def test_exported_files_are_readable_and_name_no_local_path(vpred_exports, perturbed_pipeline):
    for result in vpred_exports[1:]:
        for rel in result.files:
            path = result.out / rel
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, rel
            if path.suffix in (".json", ".md"):
                text = path.read_text()
                assert perturbed_pipeline not in text and "/tmp" not in text, rel
                assert "_name_or_path" not in text, rel
        assert stat.S_IMODE(result.out.stat().st_mode) == 0o755


def _front_matter(card: str) -> dict[str, str]:
    block = re.match(r"---\n(.*?)\n---\n", card, re.S)[1]
    return dict(line.split(": ", 1) for line in block.splitlines())


def test_model_card_of_an_untrained_export(toy_students, tmp_path):
    result = export.export(toy_students["ssd-1b"], "diffusers", tmp_path / "d")
    card = (result.out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert "stable-diffusion-xl" in meta["tags"] and "toy-model" in meta["tags"]
    assert "base_model" not in meta  # the toy is not on the hub
    assert "`mid_block.attentions.0`" in card and "not distilled yet" in card
    assert "On SDXL itself" in card and "SSD-1B" in card  # the plan's structure on the real model
    assert "python -m workbench lora" in card and "4 are inherited under another index" in card


def test_model_card_names_the_hub_teacher_and_its_license(tmp_path, tiny_teacher):
    """A teacher read from the hub cache is named by its hub id, with its license."""
    folder = tmp_path / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / "abc" / "unet"
    tiny_teacher.save_pretrained(folder)
    student = export.student_from_plan(resolve_base(str(folder)), load_preset("segmind-vega"))
    result = export.export(student, "single-file", tmp_path / "vega")
    meta = _front_matter((result.out / "README.md").read_text())
    assert (
        meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["license"] == "openrail++"
    )
    assert str(tmp_path) not in (result.out / "README.md").read_text()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, toy_students):
    """A run folder as a distillation leaves it: job.json, metrics.jsonl and student/."""
    run = RunDir(tmp_path_factory.mktemp("run"))
    student = toy_students["koala-700m"]
    config = {"stages": [student.spec.plan.to_dict()], "steps": 30, "base": "toy", "data": "toy",
              "batch_size": 4, "grad_accum": 2, "lr": 1e-4, "lr_schedule": "constant", "w_task": 1.0,
              "w_out": 0.5, "w_feat": 0.5, "feature_mode": "layer", "mixed_precision": "no"}  # fmt: skip
    write_json_atomic(run.job, {"config": config})
    writer = MetricsWriter(run)
    writer.write({"step": 29, "loss/total": 0.25, "loss/task": 0.125, "loss/feat/x": 1.0})
    writer.close()
    save_student(student.unet, student.spec, run.student)
    return run


def test_trained_student_exports_with_its_recipe(trained_run, tmp_path):
    student = export.student_from_folder(trained_run.root)
    assert student.trained and student.base.kind == "toy"
    result = export.export(student, "pipeline", tmp_path / "p")
    card = (result.out / "README.md").read_text()
    assert "distillation" in _front_matter(card)["tags"]
    assert "30 optimizer steps" in card and "| `loss/total` | 0.25000 |" in card and "loss/feat/x" not in card
    assert str(trained_run.root) not in card


def test_trained_student_from_another_teacher_is_refused(trained_run, tiny_teacher, tmp_path):
    tiny_teacher.save_pretrained(tmp_path / "other")
    with pytest.raises(WorkbenchError, match="not made from base"):
        export.student_from_folder(trained_run.student, resolve_base(str(tmp_path / "other")))


def test_an_unfinished_run_says_how_to_get_its_student(tmp_path, capsys):
    """A run folder without student/ was said to hold 'no student ... give a run folder'."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_json_atomic(run.job, {"config": {"base": "toy"}, "stages": [{}, {}]})
    run.write_status(state="stopped", step=30, total_steps=80)
    run.checkpoint_dir(30).mkdir(parents=True)
    assert main(["export", "--student", str(run.root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a run folder" not in err
    assert "holds no student yet: its run has not finished (stopped at step 30 of 80; its last " in err
    assert "checkpoint is step_0000030). A run writes its student after its last step: finish it with " in err
    assert f"`python -m workbench distill --run-dir {run.root} --resume`, then export the run folder" in err
    assert not (tmp_path / "out").exists()
    save_student(*_vega(), run.stage_dir(0))  # stage 1 of 2 done: its student can go meanwhile
    run.write_status(state="running", pid=os.getpid())  # and the run still runs
    with pytest.raises(WorkbenchError) as info:
        export.read_student_folder(run.root)
    assert "(running at step 30 of 80; its last checkpoint is step_0000030)" in str(info.value)
    assert "wait for it to finish" in str(info.value)
    assert str(info.value).endswith(f"--student {run.stage_dir(0)} --base toy")
    assert export.read_student_folder(run.stage_dir(0)).plan.name == "segmind-vega"


def _vega():
    unet, spec = build_student(tiny_unet(tiny_sdxl_config()), load_preset("segmind-vega"))
    return unet, spec


@pytest.mark.parametrize("fmt", ["checkpoint", "pipeline"])
def test_exports_read_only_what_they_write(fmt, tiny_pipeline_dir, tmp_path, monkeypatch):
    """The checkpoint and pipeline formats write the teacher's VAE and text encoders beside the
    student: the teacher's UNet is never read (at SDXL size it alone peaked at 19.75 GiB)."""
    base = resolve_base(tiny_pipeline_dir)
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    student = export.student_from_plan(base, load_preset("segmind-vega"), teacher)
    read, real = [], UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):  # the real loader, each call recorded
        read.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    result = export.export(student, fmt, tmp_path / fmt, dtype="fp32")
    assert read == [] and result.files
    assert export.load_pipeline(base).unet is not None and len(read) == 1  # the spy sees the whole pipeline's


# ------------------------------------------------------------------ command line and bad input


def test_cli_single_file_defaults_to_fp16(capsys, tmp_path):
    out = tmp_path / "vega"
    argv = ["export", "--preset", "segmind-vega", "--format", "single-file", "--out", str(out), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dtype"] == "fp16" and "vega.safetensors" in data["files"] and "README.md" in data["files"]


def test_cli_exports_a_trained_run(capsys, trained_run, tmp_path):
    out = tmp_path / "ckpt"
    assert (
        main(["export", "--student", str(trained_run.root), "--format", "checkpoint", "--out", str(out)]) == 0
    )
    assert "trained student" in capsys.readouterr().out
    assert (out / "ckpt.safetensors").is_file()


def _no_layer_map(tmp_path):
    folder = tmp_path / "plain"
    UNet2DConditionModel.from_pretrained(TOY_DIR, subfolder="unet").save_pretrained(folder)
    return folder


def _a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda t: ["--preset", "ssd-1b", "--format", "onnx", "--out", str(t / "o")], "unknown export format 'onnx'"),
        (lambda t: ["--preset", "ssd-1b", "--dtype", "fp8", "--out", str(t / "o")], "unknown export dtype"),
        (lambda t: ["--preset", "ssd-1b", "--out", str(_a_file(t))], "is an existing file"),
        (lambda t: ["--student", str(_no_layer_map(t)), "--out", str(t / "o")], "has no layer_map.json"),
        (lambda t: ["--base", "sdxl-base", "--preset", "ssd-1b", "--format", "pipeline", "--out", str(t / "o")],
         "needs the teacher's VAE"),
    ],
)  # fmt: skip
def test_bad_export_input_is_one_line(argv, message, tmp_path, capsys):
    assert main(["export", *argv(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_card_carries_the_toy_evaluation(toy_students, tmp_path):
    student = toy_students["segmind-vega"]
    pipe = export.load_pipeline(student.base)
    found = export.evaluate(student, pipe, prompts=2, seeds=1)
    result = export.export(student, "diffusers", tmp_path / "v", pipeline=pipe, evaluation=found)
    card = (result.out / "README.md").read_text()
    section = card.split("## Evaluation")[1].split("## ")[0]
    assert "2 samples (2 prompts x 1 seeds)" in section and "full prompt" in section and "SSIM" in section
    assert str(TOY_DIR) not in card


@pytest.mark.slow
def test_card_evaluation_uses_the_bases_guidance_and_lcm_for_a_consistency_student(toy_students):
    """The toy teacher samples at guidance 2 (not SDXL's 5); a w-conditioned student is scored
    the way it is meant to sample (few LCM steps), and the record says so."""
    from workbench.models import TOY_GUIDANCE
    from workbench.surgery import with_guidance_embedding

    plain = toy_students["koala-700m"]
    lcd = export.Student(spec=plain.spec, base=plain.base, unet=with_guidance_embedding(plain.unet))
    pipe = export.load_pipeline(plain.base)
    found = export.evaluate(lcd, pipe, prompts=1, seeds=1)
    assert found["settings"]["guidance"] == TOY_GUIDANCE
    assert found["settings"]["student_sampler"] == {"scheduler": "lcm", "steps": 4, "guidance": TOY_GUIDANCE}
    assert "student_sampler" not in export.evaluate(plain, pipe, prompts=1, seeds=1)["settings"]


def test_an_lcm_lora_students_pipeline_samples_with_lcm_and_says_guidance_1(toy_students, tmp_path):
    """An LCM-LoRA run's student is a stock UNet (adapters merged) that samples with LCM and no
    guided pass: the pipeline format carries the LCM scheduler and the card says so."""
    from workbench.runs import RunDir

    plain = toy_students["koala-700m"]
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.write_job({"base": "toy", "objectives": ["lcd"], "lcd_lora_rank": 4, "steps": 2}, plain.base, [])
    lora = export.Student(spec=plain.spec, base=plain.base, unet=plain.unet, run=run)
    assert export.consistency_kind(lora) == "lora" and export.consistency_kind(plain) is None
    out = export.export(lora, "pipeline", tmp_path / "p").out
    assert "LCMScheduler" in (out / "scheduler" / "scheduler_config.json").read_text()
    card = (out / "README.md").read_text()
    assert "LCM-LoRA" in card and "guidance_scale=1" in card and "Use the teacher's scheduler" not in card
