"""The memory estimate: fake-tensor run of the training step, categories, verdicts, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from workbench import memory, memory_advice, memory_phases, memory_tracker
from workbench.distill import DistillConfig
from workbench.errors import WorkbenchError
from workbench.presets import load_preset
from workbench.testing import run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_config) -> str:
    """A UNet folder (config only) of SDXL topology at tiny width: 64 px, latent 8x8."""
    folder = tmp_path_factory.mktemp("tiny-unet")
    config = {"_class_name": "UNet2DConditionModel", **tiny_config}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def _config(base: str, **fields) -> DistillConfig:
    """The estimate's run: the shared factory's, one step, batch 2."""
    return run_config(base, steps=1, fast=False, **({"batch_size": 2} | fields))


@pytest.fixture(scope="module")
def plain(tiny_base) -> memory.MemoryEstimate:
    return memory.estimate(_config(tiny_base), device="cpu")


@pytest.mark.slow
def test_categories_add_up_to_the_total(plain, tiny_base):
    lean = memory.estimate(
        _config(tiny_base, mixed_precision="bf16", gradient_checkpointing=True, grad_accum=2)
    )
    for result in (plain, lean):
        for stage in result.stages:
            assert set(stage.categories) == set(memory.CATEGORIES)
            assert sum(stage.categories.values()) == stage.total > 0
            assert all(v >= 0 for v in stage.categories.values())
        assert result.peak.total == max(s.total for s in result.stages)
        assert result.total == max(result.peak.total, *(p.total for p in result.phases))
        for phase in result.phases:
            assert set(phase.categories) == set(memory.CATEGORIES) and phase.total == sum(phase.categories.values())
    assert lean.peak.phase.endswith("(micro-batch 2)") or lean.peak.phase == "optimizer step"


def test_weights_and_optimizer_states_are_the_exact_arithmetic(plain, tiny_base):
    from workbench.catalog import build_catalog
    from workbench.surgery import compile_plan

    spec = compile_plan(
        build_catalog(json.loads(open(f"{tiny_base}/config.json").read())), load_preset("ssd-1b")
    )
    student = memory._unet(spec.config, torch.device("cpu"))
    tensors = len(list(student.parameters()))
    stage = plain.stages[0]
    assert stage.student_params == stage.trainable_params == spec.student_params
    assert stage.resident["weights"] == 4 * spec.student_params
    assert stage.resident["teacher"] == 4 * spec.teacher_params  # fp32 teacher
    # AdamW: exp_avg and exp_avg_sq in fp32 per element, plus a 4-byte step per tensor
    assert stage.resident["optimizer_states"] == 8 * spec.student_params + 4 * tensors
    assert stage.resident["encoders"] == 0  # a bare UNet folder has no text encoders
    half = memory.estimate(_config(tiny_base, teacher_dtype="bf16", w_feat=0.0), device="cpu")
    assert half.stages[0].resident["teacher"] == 2 * spec.teacher_params


def test_estimate_tracks_the_real_step(plain, tiny_base):
    """The same step on real tensors (random weights) under the same tracker."""
    real = memory.estimate(_config(tiny_base), device="cpu", fake=False)
    assert real.peak.phase == plain.peak.phase
    assert abs(real.peak.total - plain.peak.total) <= 0.01 * real.peak.total
    for name in memory.CATEGORIES:
        assert abs(real.peak.categories[name] - plain.peak.categories[name]) <= 0.01 * real.peak.total


def test_lean_options_lower_the_peak(plain, tiny_base):
    checkpointed = memory.estimate(_config(tiny_base, gradient_checkpointing=True), device="cpu")
    assert checkpointed.peak.categories["activations"] < plain.peak.categories["activations"]
    no_teacher = memory.estimate(_config(tiny_base, w_out=0.0, w_feat=0.0), device="cpu")
    assert no_teacher.peak.total < plain.peak.total


def test_cuda_autocast_emulation_follows_cudas_lists():
    x = torch.randn(1, 8, 4, 4)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    linear = torch.nn.Linear(4, 4)
    with memory_tracker.CudaAutocast(torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16  # convolutions and matmuls: low precision
        assert linear(h).dtype == torch.bfloat16
        assert F.group_norm(h, 4).dtype == torch.float32  # norms: fp32 on CUDA (bf16 on CPU)
        assert F.layer_norm(h, (4,)).dtype == torch.float32
        assert F.interpolate(h, scale_factor=2.0).dtype == torch.float32
        assert h.softmax(-1).dtype == torch.float32
        assert F.gelu(h).dtype == torch.bfloat16  # not listed: runs in its input's dtype
        a, b = conv.weight, conv.weight
        assert memory_tracker.CudaAutocast.__dict__  # the cache below is per context
    with memory_tracker.CudaAutocast(torch.bfloat16) as mode:
        assert mode._cast(a, torch.bfloat16) is mode._cast(b, torch.bfloat16)  # weights cast once
    assert not mode._cache


def _estimate(total: int) -> memory.MemoryEstimate:
    stage = memory.StagePeak(1, "p", total, dict.fromkeys(memory.CATEGORIES, 0) | {"weights": total}, "backward",
                             {}, 1, 1, 1)  # fmt: skip
    return memory.MemoryEstimate("cuda", (stage,), {}, (), 0.0)


def test_verdicts_keep_a_margin_for_the_cuda_context():
    gib = memory.GIB
    verdicts = {v["gpu_gb"]: v["verdict"] for v in _estimate(20 * gib).verdicts()}
    assert verdicts == {16: "no", 24: "fits", 40: "fits", 48: "fits", 80: "fits"}
    # 22.5 GiB of tensors + 1 GiB context fit 24 GiB only without the allocator margin
    assert _estimate(int(22.5 * gib)).verdicts((24,))[0]["verdict"] == "tight"
    assert _estimate(23 * gib + 1).verdicts((24,))[0]["verdict"] == "no"


@pytest.mark.slow
def test_suggestions_name_the_cheapest_options_that_fit(tiny_base):
    config = _config(tiny_base, w_feat=0.0)
    first = memory.estimate(config, device="cpu")
    with_bf16 = memory.estimate(dataclasses.replace(config, teacher_dtype="bf16"), device="cpu")
    size = (with_bf16.needed() + first.needed()) / 2 / memory.GIB  # between the two
    rows = memory.suggestions(config, first, sizes_gb=(size,))
    assert rows == [
        {
            "gpu_gb": size,
            "fits": True,
            "options": ["teacher in bf16"],
            "flags": "--teacher-dtype bf16",
            "total_gb": round(with_bf16.total / memory.GIB, 3),
        }
    ]


def test_bad_inputs_are_one_line_errors(tiny_base):
    with pytest.raises(WorkbenchError, match="multiple of 32 px"):
        memory.estimate(_config(tiny_base, resolution=48))
    with pytest.raises(WorkbenchError, match="unknown memory target 'tpu'"):
        memory.estimate(_config(tiny_base), device="tpu")
    with pytest.raises(WorkbenchError, match="batch size must be > 0"):
        memory.estimate(_config(tiny_base, batch_size=0))


@pytest.mark.slow
def test_cli_json(tiny_base, capsys):
    from workbench.cli import main

    code = main(["memory", "--base", tiny_base, "--preset", "ssd-1b", "--batch-size", "1", "--target", "cpu",
                 "--mixed-precision", "bf16", "--no-suggest", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(out["categories_bytes"].values()) == out["total_bytes"]
    assert [v["gpu_gb"] for v in out["verdicts"]] == [16, 24, 40, 48, 80]
    assert out["settings"]["mixed_precision"] == "bf16" and out["suggestions"] is None
    assert main(["memory", "--base", tiny_base, "--preset", "ssd-1b", "--resolution", "40"]) == 2
    assert "multiple of 32 px" in capsys.readouterr().err


def test_8bit_adamw_layout_is_bitsandbytes(tiny_base):
    """The estimate's 8-bit AdamW states take the bytes bitsandbytes' own states take."""
    bnb = pytest.importorskip("bitsandbytes")
    from workbench.optim import make_optimizer

    spec_config = json.loads(open(f"{tiny_base}/config.json").read())
    model = memory._unet(spec_config, torch.device("cpu"))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    real = make_optimizer(params, DistillConfig(stages=({},), steps=1, lr=1e-4, optimizer="adamw8bit"))
    assert isinstance(real, bnb.optim.AdamW8bit)
    real.step()
    layout = memory_tracker.AdamW8bitLayout(params, lr=1e-4)
    layout.step()
    # equal, and below AdamW's 8 bytes per weight (tiny tensors keep 32-bit states)
    assert (
        memory_tracker.state_bytes(layout)
        == memory_tracker.state_bytes(real)
        < 2 * memory_tracker.storage_bytes(params)
    )


def test_a_run_out_of_memory_fails_with_the_options_that_would_help(tmp_path, monkeypatch, tiny_pipeline_dir):
    from workbench.distill import run_distillation
    from workbench.runs import RunDir

    monkeypatch.setenv("WORKBENCH_FAULT_STEP", "1")
    monkeypatch.setenv("WORKBENCH_FAULT_KIND", "oom")  # torch.OutOfMemoryError, as a full GPU raises it
    config = run_config(tiny_pipeline_dir, steps=3, toy_samples=8, sample_steps=1)
    with pytest.raises(WorkbenchError) as err:
        run_distillation(config, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and message.startswith("out of memory on cpu: try, cheapest first, ")
    assert "--teacher-dtype bf16" in message and "--gradient-checkpointing" in message
    assert "--optimizer adamw8bit" in message and "python -m workbench memory" in message
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and status["error"] == message


def test_precomputed_targets_take_the_teacher_off_the_device(plain, tiny_base):
    """--teacher-targets precompute: no teacher weights in a student step, only its targets read
    back (as the real step on real tensors shows); a precompute phase without optimizer states;
    the disk a step's targets take."""
    config = _config(tiny_base, teacher_targets="precompute")
    fake = memory.estimate(config, device="cpu")
    real = memory.estimate(config, device="cpu", fake=False)
    stage = fake.stages[0]
    assert stage.resident["teacher"] == 0 and fake.peak.categories["teacher"] == 0
    assert fake.peak.total < plain.peak.total and fake.peak.total <= plain.peak.total - plain.stages[0].resident["teacher"] // 2
    assert fake.settings["teacher_targets"] == "precompute"
    assert abs(real.peak.total - fake.peak.total) <= 0.01 * real.peak.total and real.peak.phase == fake.peak.phase
    # prediction (B, 4, 8, 8) fp32 and 26 feature maps in the teacher's dtype: what the files hold
    assert stage.teacher_targets_disk_bytes == real.stages[0].teacher_targets_disk_bytes > 2 * 4 * 8 * 8 * 4
    assert "MiB of disk per step" in memory_advice.report(fake)
    assert plain.stages[0].teacher_targets_disk_bytes == 0


def test_the_estimate_reads_like_the_written_targets(tiny_base, tmp_path):
    """The disk figure is the bytes the recipe's store writes for the same micro-batch."""
    from workbench import losses, targets
    from workbench.catalog import build_catalog
    from workbench.surgery import compile_plan

    config = _config(tiny_base, teacher_targets="precompute", teacher_dtype="bf16")
    teacher_config = json.loads(open(f"{tiny_base}/config.json").read())
    spec = compile_plan(build_catalog(teacher_config), load_preset("ssd-1b"))
    teacher = memory._unet(teacher_config, torch.device("cpu")).to(torch.bfloat16).eval()
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([1, 500]),  # a micro-batch of 2
              "encoder_hidden_states": torch.randn(2, 77, 16),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 8), "time_ids": torch.randn(2, 6)}}  # fmt: skip
    batch = {"inputs": inputs}
    setup = losses.KDSetup(config.weights, spec.feature_pairs("layer"))
    written = targets.TargetStore(tmp_path).write(0, 0, losses.teacher_targets(teacher, batch, setup))
    assert memory.estimate(config, device="cpu").stages[0].teacher_targets_disk_bytes == written


# --------------------------------------------------------------------------- lcd stages


@pytest.fixture(scope="module")
def lcd(tiny_base) -> memory.MemoryEstimate:
    return memory.estimate(_config(tiny_base, objectives=("lcd",)), device="cpu")


def test_an_lcd_stage_holds_its_target_network(plain, lcd, tiny_base):
    """An lcd stage: the student gains the guidance embedding, the EMA target network (a full
    copy of it) is its own category, and the step (2x-batch teacher, target, student) peaks
    above the kd step of the same plan (which has no target network)."""
    from workbench.surgery import GUIDANCE_EMBED_DIM

    kd, stage = plain.stages[0], lcd.stages[0]
    assert (stage.kind, kd.kind) == ("lcd", "kd") and lcd.settings["stage_kinds"] == ["lcd"]
    channels = json.loads(open(f"{tiny_base}/config.json").read())["block_out_channels"][0]
    cond_proj = 4 * GUIDANCE_EMBED_DIM * channels  # bias-free Linear into the time embedding, fp32
    assert stage.resident["weights"] == kd.resident["weights"] + cond_proj
    assert stage.resident["ema_target"] == stage.resident["weights"] and kd.resident["ema_target"] == 0
    assert (
        lcd.peak.categories["ema_target"] == stage.resident["ema_target"] and plain.peak.categories["ema_target"] == 0
    )
    assert lcd.peak.total > plain.peak.total and sum(lcd.peak.categories.values()) == lcd.peak.total
    assert "(lcd)" in memory_advice.report(lcd)


def test_the_lcd_estimate_tracks_the_real_step(lcd, tiny_base):
    real = memory.estimate(_config(tiny_base, objectives=("lcd",)), device="cpu", fake=False)
    assert real.peak.phase == lcd.peak.phase
    for name in memory.CATEGORIES:
        assert abs(real.peak.categories[name] - lcd.peak.categories[name]) <= 0.01 * real.peak.total, name


@pytest.mark.slow
def test_lcm_lora_trains_adapters_on_a_frozen_student(lcd, tiny_base):
    lora = memory.estimate(_config(tiny_base, objectives=("lcd",), lcd_lora_rank=4), device="cpu")
    full, stage = lcd.stages[0], lora.stages[0]
    assert stage.trainable_params < stage.student_params // 2  # rank 4 on tiny widths: a third
    assert stage.resident["optimizer_states"] < full.resident["optimizer_states"] // 2
    assert stage.resident["ema_target"] == stage.resident["weights"]  # the copy holds the adapters too
    assert lora.peak.total < lcd.peak.total  # smaller optimizer states outweigh the adapters


def test_lcd_options_the_recipe_refuses_are_refused(tiny_base):
    with pytest.raises(WorkbenchError, match="only the last stage can be lcd"):
        two = _config(tiny_base)
        memory.estimate(dataclasses.replace(two, stages=two.stages * 2, objectives=("lcd", "kd")))
    with pytest.raises(WorkbenchError, match="precompute does not apply to an lcd stage"):
        memory.estimate(_config(tiny_base, objectives=("lcd",), teacher_targets="precompute"))
    with pytest.raises(WorkbenchError, match="--ranks with an lcd stage"):
        memory.estimate(_config(tiny_base, objectives=("lcd",)), ranks=2)
    lean = [o.flags for o in memory_advice.LEAN_OPTIONS if o.applies(_config(tiny_base, objectives=("lcd",)))]
    assert "--lcd-lora-rank 64" in lean and "--lora-rank 64" not in lean
    assert "--teacher-targets precompute" not in lean


@pytest.mark.slow
def test_cli_estimates_an_lcd_stage(tiny_base, capsys):
    from workbench.cli import main

    code = main(["memory", "--base", tiny_base, "--stages", "ssd-1b,lcd", "--batch-size", "2", "--target", "cpu",
                 "--no-suggest", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["stage_kinds"] == ["kd", "lcd"] and [s["kind"] for s in out["stages"]] == [
        "kd",
        "lcd",
    ]
    assert out["stages"][1]["resident"]["ema_target"] > 0 and out["stages"][0]["resident"]["ema_target"] == 0
    assert main(["memory", "--base", tiny_base, "--stages", "lcd"]) == 2
    assert "lcd needs a plan before it" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_peaks_are_reused_where_nothing_a_step_reads_changed(plain, lcd, tiny_base):
    again = memory.estimate(
        dataclasses.replace(_config(tiny_base), steps=5, seed=3), device="cpu"
    )  # no step reads these
    assert again.stages[0] is plain.stages[0]
    assert "1 of 1 stage peaks reused from an earlier estimate" in again.notes[-1]
    two = _config(tiny_base)
    staged = memory.estimate(
        dataclasses.replace(two, stages=two.stages * 2, objectives=("kd", "lcd")), device="cpu"
    )
    assert staged.stages[0] is plain.stages[0]  # the kd stage before the lcd stage: the kd run's
    assert staged.stages[1].kind == "lcd" and staged.stages[1].resident == lcd.stages[0].resident
    from workbench.models import resolve_base

    base = resolve_base(tiny_base)
    key = memory._peak_key(_config(tiny_base), base, 0, "cpu")
    assert key == memory._peak_key(dataclasses.replace(_config(tiny_base), steps=9), base, 0, "cpu")
    for changed in ({"batch_size": 1}, {"mixed_precision": "bf16"}, {"lcd_ema": 0.5}, {"resolution": 128}):
        assert memory._peak_key(_config(tiny_base, **changed), base, 0, "cpu") != key, changed
    assert memory._peak_key(_config(tiny_base), base, 0, "cuda") != key


def test_an_rg_lcd_estimate_says_the_reward_is_not_counted(lcd, tiny_base, tmp_path):
    scorer = tmp_path / "scorer.py"
    scorer.write_text("def score(latents, cond):\n    return latents.mean(dim=(1, 2, 3))\n")
    config = _config(tiny_base, objectives=("lcd",), lcd_reward=f"{scorer}:score", lcd_reward_weight=0.1)
    estimate = memory.estimate(config, device="cpu")
    assert any("reward is not counted" in n for n in estimate.notes)
    assert not any("reward" in n for n in lcd.notes)


# --------------------------------------------------------------------------- the run outside a step


def test_drawing_activations_on_the_meta_device_match_a_real_forward(tiny_config):
    """The phases' drawing estimate (a UNet forward without gradients, on the meta device)
    against the same forward on real tensors under the same tracker."""
    from workbench.testing import tiny_unet

    key = memory_phases._key(tiny_config)
    meta = memory_phases.unet_forward_bytes(key, 6, 8, 16)
    unet = tiny_unet(tiny_config)
    inputs = memory_phases._unet_inputs(tiny_config, 6, 8, 16)
    tracker = memory_tracker.Tracker()
    for t in (*unet.parameters(), *unet.buffers()):
        tracker.claim(t, "weights")
    own = tracker.total
    with torch.no_grad(), tracker:
        unet(**inputs)
    real = max(total for total, _ in tracker.peaks.values()) - own
    assert real > 0 and abs(meta - real) <= 0.02 * real
    assert memory_phases.unet_forward_bytes(key, 12, 8, 16) > 1.8 * meta  # activations grow with the batch


def test_the_run_phases_count_the_pipeline_and_the_drawing(tiny_pipeline_dir, tmp_path):
    """A pipeline base: the data phase holds the whole pipeline (UNet in fp32, text encoders
    and VAE) and the teacher drawing a prompt file; more prompts, larger drawing; the sample
    grid brings the encoders back beside the student; the peak names its phase."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a prompt {i}" for i in range(12)), encoding="utf-8")
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n", encoding="utf-8")
    result = memory.estimate(_config(tiny_pipeline_dir, data=str(prompts)), device="cpu")
    small = memory.estimate(_config(tiny_pipeline_dir, data=str(few)), device="cpu")
    data, assembly, grid = result.phases
    encoders, _ = memory.encoder_bytes(memory.resolve_base(tiny_pipeline_dir))
    teacher = result.stages[0].teacher_params * 4
    assert encoders > 0 and data.categories["encoders"] == grid.categories["encoders"] == encoders
    assert data.categories["teacher"] == assembly.categories["teacher"] == teacher
    assert data.categories["activations"] > small.phases[0].categories["activations"] > 0
    assert assembly.categories["weights"] == result.stages[0].resident["weights"] == grid.categories["weights"]
    assert grid.categories["optimizer"] == 0 and grid.categories["teacher"] == 0  # end of run, on the CPU
    base = memory.resolve_base(tiny_pipeline_dir)
    specs = memory.check_plans(small_config := _config(tiny_pipeline_dir, data=str(few)), base.unet_config)
    on_gpu = memory_phases.run_phases(small_config, base, specs, small.stages, "cuda", 64, encoders, 16)[2]
    assert on_gpu.categories["teacher"] == teacher  # beside a GPU the pipeline's UNet comes to the device
    mid_run = memory.estimate(_config(tiny_pipeline_dir, data=str(few), sample_every=1), device="cpu").phases[2]
    assert mid_run.categories["optimizer"] == result.stages[0].resident["optimizer_states"] > 0
    top = max([result.peak.total, *(p.total for p in result.phases)])
    assert result.total == top and result.where in memory_advice.report(result)
    assert [p["name"] for p in result.to_dict()["phases"]] == [p.name for p in result.phases]
