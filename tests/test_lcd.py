"""Few-step students: LCM sampling, w-conditioning, latent consistency distillation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.schedulers import check_sampler, guidance_embedding, make_scheduler
from workbench.testing import LCD_RUN, run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(perturbed_pipeline) -> str:
    return perturbed_pipeline


@pytest.fixture(scope="module")
def pipe(base):
    return StableDiffusionXLPipeline.from_pretrained(base)


# --------------------------------------------------------------------------- LCM sampling


@pytest.mark.parametrize(
    ("scheduler", "steps", "match"),
    [("lcm", 0, "whole number of denoising steps >= 1"), ("lcm", 9, "1 to 8 steps"), ("ddpm", 4, "unknown")],
)
def test_bad_sampler_is_one_line_error(scheduler, steps, match):
    with pytest.raises(WorkbenchError, match=match):
        check_sampler(scheduler, steps)


def test_lcm_scheduler_keeps_the_noise_schedule(pipe):
    lcm = make_scheduler("lcm", pipe.scheduler)
    assert (
        type(lcm).__name__ == "LCMScheduler" and make_scheduler("default", pipe.scheduler) is pipe.scheduler
    )
    assert lcm.config.prediction_type == pipe.scheduler.config.prediction_type
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == [999, 759, 499, 259]


def test_guidance_embedding_is_the_pipelines(pipe):
    scale = torch.tensor([1.0, 2.5, 8.0])
    expected = pipe.get_guidance_scale_embedding(scale - 1, embedding_dim=32)
    assert torch.allclose(guidance_embedding(scale, 32), expected, atol=1e-6)


def test_one_step_lcm_sampling_with_the_cli_puts_the_scheduler_back(base, tmp_path, capsys):
    out = tmp_path / "one.png"
    argv = ["sample", "--base", base, "--prompt", "a red circle", "--scheduler", "lcm", "--steps", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.exists()
    assert main([*argv[:-1], "9", "--out", str(out)]) == 2
    assert "1 to 8 steps" in capsys.readouterr().err
    assert main([*argv[:-2], "--out", str(out)]) == 0  # no --steps: LCM's default (4), not 20


def test_sample_cli_takes_both_nasa_scales(base, tmp_path, capsys):
    out = tmp_path / "steered.png"
    argv = ["sample", "--base", base, "--prompt", "a red circle", "--guidance", "1", "--steps", "2",
            "--negative-prompt", "red", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--nasa-scale", "0.5", "--nasa-pooled-scale", "1.5"]) == 0 and out.exists()
    assert main([*argv, "--nasa-pooled-scale", "3"]) == 2
    assert "--nasa-pooled-scale must be a number from 0 to 2" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_samples_the_student_with_its_own_scheduler(base):
    from workbench.ui import compare_tab, plan_view
    from workbench.ui.settings import Limits
    from workbench.ui.store import Store

    store, view = Store(), plan_view.new_view(base, 64)
    form = compare_tab.Form("a red circle", "", "3", 2, 2.0, 32, student_scheduler="lcm", student_steps=1)
    teacher, student, summary = compare_tab.compare(store, Limits(), view, [], form)
    assert len(teacher) == len(student) == 1 and "student: 1 lcm steps" in summary
    assert type(store.pipeline(base).scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(WorkbenchError, match="1 to 8 steps"):
        compare_tab.validate(store, base, Limits(), compare_tab.Form("a", "", "0", 20, 2.0, None, "lcm"))


def test_compare_takes_a_negative_prompt_per_model():
    from workbench.ui import compare_tab
    from workbench.ui.settings import Limits
    from workbench.ui.store import Store

    store = Store()

    def validate(*more):
        return compare_tab.validate(store, "sdxl-base", Limits(), compare_tab.Form(*args, *more))

    args = ("a red circle", "blue", "0", 4, 1.0, None, "lcm", 2)
    request = validate(" red ", 1.5, 0.7)
    assert request.student_kw == {"scheduler": "lcm", "steps": 2, "negative_prompt": "red"}
    assert request.nasa_scale == 1.5 and request.nasa_pooled_scale == 0.7 and request.negative == "blue"
    assert validate().student_kw["negative_prompt"] == "blue"
    with pytest.raises(WorkbenchError, match="NASA scale must be a number from 0 to 2"):
        validate("", 5)
    with pytest.raises(WorkbenchError, match="NASA pooled scale must be a number from 0 to 2"):
        validate("", 0.5, -1)
    with pytest.raises(
        WorkbenchError, match="student steps must be 1 to 100, or 0 for the teacher's steps, got -1"
    ):
        compare_tab.validate(store, "sdxl-base", Limits(), compare_tab.Form(*args[:-2], "default", -1))
    teachers = compare_tab.validate(store, "sdxl-base", Limits(), compare_tab.Form(*args[:-2], "default", 0))
    assert teachers.student_kw["steps"] == 4  # 0: the teacher's steps


# --------------------------------------------------------------------------- w-conditioning and the loss


@pytest.fixture(scope="module")
def lcd_parts(tiny_teacher):
    from workbench.testing import lcd_parts

    return lcd_parts(tiny_teacher)


def test_w_conditioning_starts_as_the_unet_and_then_changes_the_output(lcd_parts, tiny_teacher):
    from workbench.schedulers import is_w_conditioned

    _, student, _, batch = lcd_parts
    student = __import__("copy").deepcopy(student).eval()
    x, text = batch["consistency"]["latents"], batch["consistency"]["cond"]
    t = torch.tensor([500, 500])
    w = {s: guidance_embedding(torch.tensor([s, s]), 256) for s in (1.5, 4.0)}
    with torch.no_grad():
        plain = tiny_teacher(x, t, **text).sample
        low = student(x, t, timestep_cond=w[1.5], **text).sample
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.05)
        low2, high = (student(x, t, timestep_cond=w[s], **text).sample for s in (1.5, 4.0))
    assert is_w_conditioned(student) and not is_w_conditioned(tiny_teacher)
    assert student.config.time_cond_proj_dim == 256
    assert torch.equal(low, plain)  # zero-initialised: the UNet it was made from
    assert (high - low2).abs().max() > 1e-4  # the guidance embedding now changes the output


def test_lcd_loss_decreases_on_a_tiny_model(lcd_parts):
    import copy

    from workbench import losses

    teacher, student, setup, batch = lcd_parts
    student = copy.deepcopy(student).train().requires_grad_(True)
    targets = losses.lcd_targets(teacher, batch, setup)
    assert targets.x_t.shape == targets.target.shape == (2, 4, 8, 8)
    assert targets.t.tolist() == [119, 919]  # timesteps 100, 900: grid positions 5, 45: (n + 1) * 20 - 1
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    seen = []
    for _ in range(6):
        terms = losses.lcd_objective(batch, student, student, targets, setup)
        terms["loss/total"].backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(terms["loss/lcd"].item())
    assert set(terms) == {"loss/lcd", "loss/total"} and seen[-1] < 0.7 * seen[0], seen
    before = [p.clone() for p in setup.target.parameters()]
    losses.ema_update(student, setup)  # the target follows the student by 1 - ema
    after = list(setup.target.parameters())
    moved = [(a - b).abs().max().item() for a, b in zip(after, before)]
    assert max(moved) > 0


def test_boundary_scalings_and_solver_grid():
    from workbench.losses import boundary_scalings, solver_timesteps

    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    assert c_skip.flatten().tolist()[0] == 1.0 and c_out.flatten().tolist()[0] == 0.0
    assert c_skip.flatten()[1] < 1e-6 and c_out.flatten()[1] > 0.999
    t, prev = solver_timesteps(torch.tensor([0, 1, 49]), 1000, 50)
    assert t.tolist() == [19, 39, 999] and prev.tolist() == [0, 19, 979]


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon", "sample"])
def test_lcd_maths_is_diffusers_lcm_and_ddim(lcd_parts, kind):
    """The consistency output is LCMScheduler.step's ``denoised`` and the solver step is
    DDIMScheduler's (eta 0) on the 50-step grid, for each prediction type, on a real UNet output."""
    import dataclasses

    from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

    from workbench import losses
    from workbench.models import TOY_DIR

    teacher, _, setup, batch = lcd_parts
    setup = dataclasses.replace(setup, prediction_type=kind)
    config = DDPMScheduler.from_pretrained(TOY_DIR, subfolder="scheduler").config
    # as keywords: from_config resets config keys the file left at their defaults (clip_sample)
    lcm = LCMScheduler.from_config(config, prediction_type=kind, original_inference_steps=setup.solver_steps)
    ddim = DDIMScheduler.from_config(
        config, prediction_type=kind, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    ddim.set_timesteps(setup.solver_steps)
    x, text = batch["consistency"]["latents"][:1], _first(batch["consistency"]["cond"])
    lcm.set_timesteps(4)
    for t in [int(t) for t in lcm.timesteps[1:]]:  # 999: no x0 from epsilon on a zero-SNR schedule
        tt = torch.tensor([t])
        with torch.no_grad():
            out = teacher(x, tt, **text).sample
            mine = losses.consistency_function(teacher, x, tt, None, text, setup)
        lcm._step_index = lcm.num_inference_steps - 1  # the last step: no fresh noise
        assert torch.allclose(mine, lcm.step(out, t, x).denoised, atol=1e-5), t
        alpha = setup.alphas_cumprod[tt][:, None, None, None]
        x0, eps = losses.x0_and_eps(out, x, alpha, kind)
        _, prev = losses.solver_timesteps(tt * setup.solver_steps // 1000, 1000, setup.solver_steps)
        a_prev = setup.alphas_cumprod[prev][:, None, None, None]
        ddim_prev = ddim.step(out, t, x, eta=0.0).prev_sample
        assert torch.allclose(a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, ddim_prev, atol=1e-5), t


def _first(value):
    return {k: _first(v) for k, v in value.items()} if isinstance(value, dict) else value[:1]


# --------------------------------------------------------------------------- the lcd stage in a run


def _config(base, steps=3, **changes):
    return run_config(base, steps=steps, **(LCD_RUN | changes))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lcd_guidance_min": 4.0, "lcd_guidance_max": 2.0}, "guidance range runs backwards"),
        ({"lcd_sample_steps": 0}, "lcd-sample-steps must be a whole number of LCM steps"),
        ({"lcd_sample_steps": 9}, "from 1 to 8, got 9"),
        ({"lcd_sample_steps": 10**12}, "from 1 to 8, got 1000000000000"),
        ({"objectives": ("lcd", "kd"), "stages": None}, "only the last stage can be lcd"),
        ({"objectives": ("consistency",)}, "unknown objective 'consistency'"),
        ({"objectives": ("kd", "lcd")}, "2 objectives for 1 stages"),
        ({"lora_rank": 4}, "does not apply to an lcd stage"),
        ({"lcd_loss": "l1"}, "lcd-loss .l1."),
    ],
)
def test_bad_lcd_options_fail_before_anything_loads(base, changes, match):
    from workbench.distill_config import preflight

    if changes.get("stages", 1) is None:
        changes["stages"] = _config(base).stages * 2
    with pytest.raises(WorkbenchError, match=match):
        preflight(_config(base, **changes))


def test_lcd_needs_the_teachers_scheduler(base, tmp_path):
    import shutil

    from workbench.distill_config import preflight

    copy = shutil.copytree(base, tmp_path / "no-scheduler")
    shutil.rmtree(copy / "scheduler")
    with pytest.raises(WorkbenchError, match="no readable scheduler"):
        preflight(_config(str(copy)))
    # epsilon on a zero-terminal-SNR schedule: no clean latents from the noise at t=999
    zero_snr = shutil.copytree(base, tmp_path / "eps-zero-snr")
    path = zero_snr / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"prediction_type": "epsilon", "rescale_betas_zero_snr": True}))
    with pytest.raises(WorkbenchError, match="epsilon on a zero-terminal-SNR"):
        preflight(_config(str(zero_snr)))
    path.write_text(json.dumps(config | {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    preflight(_config(str(zero_snr)))


def test_cli_stages_lcd_repeats_the_plan_before_it():
    from workbench.distill_config import stage_fields

    fields = stage_fields(["ssd-1b", "segmind-vega", "lcd"], None)
    assert fields["objectives"] == ("kd", "kd", "lcd") and fields["stages"][1] == fields["stages"][2]
    assert "objectives" not in stage_fields(["ssd-1b"], "kd")
    with pytest.raises(WorkbenchError, match="lcd needs a plan before it"):
        stage_fields(["lcd"], None)


def test_fsdp_refuses_lcd_and_lora_kd_before_anything_loads(base):
    """A sharded student cannot be deep-copied into LCD's EMA target (torch: "FSDP does not
    support deepcopy"): refused in one line at setup, as LoRA-KD is."""
    from workbench.distill import check_sharding

    check_sharding(_config(base), sharded=False)
    with pytest.raises(WorkbenchError, match="lcd stage with FSDP.*--multi_gpu"):
        check_sharding(_config(base), sharded=True)
    with pytest.raises(WorkbenchError, match="--lora-rank with FSDP"):
        check_sharding(_config(base, objectives=(), lora_rank=4), sharded=True)


def test_sample_grids_draw_an_lcm_lora_student_without_guidance(base, pipe, tmp_path):
    """LCD students draw their grid rows with LCM; an LCM-LoRA one (no w-embedding, never
    trained on the empty prompt) also without a classifier-free guidance pass."""
    from workbench.distill import grid_sampler
    from workbench.sampling import SampleGrids, generate, grid

    assert grid_sampler(_config(base, objectives=()), 0) is None
    assert grid_sampler(_config(base), 0) == {"scheduler": "lcm", "steps": 1}
    lora = grid_sampler(_config(base, lcd_lora_rank=4), 0)
    assert lora == {"scheduler": "lcm", "steps": 1, "guidance": 1.0}
    grids = SampleGrids(pipe, tmp_path, ["a red circle"], steps=2, guidance=2.0)
    saved = np.asarray(Image.open(grids.save(pipe.unet, 1, lora)))
    row = generate(pipe, ["a red circle"], [0], unet=pipe.unet, **lora)
    assert np.array_equal(saved, np.asarray(grid([grids.teacher_row, row])))
    with pytest.raises(ValueError, match="sampler keys"):
        grids.save(pipe.unet, 2, {"sched": "lcm"})


def test_the_sample_seed_option_moves_the_grids_noise(base, pipe, tmp_path):
    """--sample-seed (the form's Sample seed): the grids' first prompt takes that seed."""
    from workbench.cli import build_parser
    from workbench.commands.distill import config_from_args
    from workbench.sampling import SampleGrids, generate
    from workbench.ui import distill_tab

    args = build_parser().parse_args(["distill", "--preset", "ssd-1b", "--run-dir", "r", "--sample-seed", "7"])
    assert config_from_args(args).sample_seed == 7 and "sample_seed" in distill_tab.FORM_KEYS
    grids = SampleGrids(pipe, tmp_path, ["a red circle"], steps=2, guidance=2.0, first_seed=7)
    seven = generate(pipe, ["a red circle"], [7], steps=2, guidance=2.0)
    zero = generate(pipe, ["a red circle"], [0], steps=2, guidance=2.0)
    assert np.array_equal(np.asarray(grids.teacher_row[0]), np.asarray(seven[0]))
    assert not np.array_equal(np.asarray(seven[0]), np.asarray(zero[0]))


@pytest.mark.slow
def test_lcd_run_resumes_exactly_and_exports_a_w_conditioned_student(base, tmp_path):
    from diffusers import UNet2DConditionModel

    from workbench.runs import RunDir
    from workbench.testing import straight_and_resumed

    def by_step(rows):
        return {r["step"]: r["loss/lcd"] for r in rows}

    reference, resumed = map(by_step, straight_and_resumed(_config(base), tmp_path))
    assert sorted(resumed) == [0, 1, 2]  # step 2's target is the EMA network restored from the checkpoint
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, abs=1e-6), step
    run = RunDir(tmp_path / "straight")
    card = (run.student / "README.md").read_text()
    assert "by latent consistency distillation" in card and "output KD" not in card  # an LCD-only recipe
    unet, info = UNet2DConditionModel.from_pretrained(run.student, output_loading_info=True)
    assert all(not v for v in info.values()) and unet.config.time_cond_proj_dim == 256
    assert list(run.samples.glob("step_*.png"))
    pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet)
    pipe.scheduler = make_scheduler("lcm", pipe.scheduler)
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=2.0, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    # export: the pipeline format carries the LCM scheduler; the SGM layouts have no w-embedding key
    from workbench.export import export, student_from_folder
    from workbench.models import resolve_base

    student = student_from_folder(run.root, base=resolve_base(base))
    export(student, "pipeline", tmp_path / "exported")
    assert "LCMScheduler" in (tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text()
    with pytest.raises(WorkbenchError, match="guidance embedding"):
        export(student, "single-file", tmp_path / "single")


@pytest.mark.slow
def test_lcm_lora_run_exports_a_lora_that_load_lora_weights_takes(base, tmp_path):
    from diffusers import UNet2DConditionModel

    from workbench.distill import LCM_LORA_DIR, run_distillation
    from workbench.models import load_unet
    from workbench.presets import load_preset
    from workbench.runs import RunDir
    from workbench.surgery import build_student

    with pytest.raises(WorkbenchError, match="no stage is lcd"):
        run_distillation(_config(base, objectives=(), lcd_lora_rank=4), tmp_path / "bad")
    status = run_distillation(_config(base, steps=2, lcd_lora_rank=4, lr=1e-2), tmp_path / "lora")
    assert status["state"] == "done"
    run = RunDir(tmp_path / "lora")
    assert (run.root / LCM_LORA_DIR / "pytorch_lora_weights.safetensors").is_file()
    merged = UNet2DConditionModel.from_pretrained(run.student)  # adapters folded in: a stock UNet
    assert merged.config.time_cond_proj_dim is None
    start, _ = build_student(load_unet(base), load_preset("ssd-1b"))  # what the stage started from
    pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=start)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500])
    text = {"encoder_hidden_states": torch.randn(1, 4, start.config.cross_attention_dim, generator=gen),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.randn(1, 6, generator=gen)}}  # fmt: skip
    with torch.no_grad():
        before = start(x, t, **text).sample
        pipe.load_lora_weights(str(run.root / LCM_LORA_DIR))
        with_lora, folded = pipe.unet(x, t, **text).sample, merged(x, t, **text).sample
    assert (with_lora - before).abs().max() > 1e-4  # the adapter trained
    assert torch.allclose(with_lora, folded, atol=1e-4)  # the file is the merged student's adapter


# --------------------------------------------------------------------------- per-image latency


def test_per_image_latency_counts_steps_calls_and_the_other_parts():
    from workbench.latency import FEW_STEP_SAMPLING, TEACHER_SAMPLING, Sampling, per_image

    image = per_image(0.1, 0.05, {"text_s": 0.2, "decode_s": 0.3})
    assert image["teacher"]["calls"] == 40 and image["student"]["calls"] == 4
    assert image["teacher"]["total_s"] == pytest.approx(0.2 + 40 * 0.1 + 0.3)
    assert image["student"]["total_s"] == pytest.approx(0.2 + 4 * 0.05 + 0.3)
    assert image["speedup"] == pytest.approx(4.5 / 0.7)
    unet_only = per_image(0.1, 0.05, None, TEACHER_SAMPLING, Sampling(4, guided=True))
    assert unet_only["student"]["total_s"] == pytest.approx(0.4) and not unet_only["parts_measured"]
    assert FEW_STEP_SAMPLING.describe() == "4 steps x 1 call"
    with pytest.raises(WorkbenchError, match="whole number >= 1"):
        Sampling(0, guided=False)


@pytest.mark.slow
def test_blocks_tab_measures_teacher_and_student_per_image(base, tmp_path, monkeypatch):
    from workbench.ui import blocks_tab, plan_view
    from workbench.ui.store import Store

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "latency"))
    store, view = Store(), plan_view.new_view(base, 64)
    text = blocks_tab.measure_latency(store, view, [], "cpu", "fp32", 1, None, None, 20, 2, False)
    assert "**Per image** (text encoders + UNet calls + VAE decode)" in text
    assert "20 steps x 2 calls" in text and "2 steps x 1 call" in text
    with pytest.raises(WorkbenchError, match="student steps must be a whole number"):
        blocks_tab.measure_latency(store, view, [], "cpu", "fp32", 1, None, None, 20, 0, False)


# --------------------------------------------------------------------------- negative prompts without guidance


def test_nasa_steers_cross_attention_and_puts_the_processors_back(lcd_parts):
    from workbench.negative import check_scale, negative_away

    _, student, _, batch = lcd_parts
    student = __import__("copy").deepcopy(student).eval()
    x, text = batch["consistency"]["latents"], batch["consistency"]["cond"]
    t, w = torch.tensor([500, 500]), guidance_embedding(torch.tensor([2.0, 2.0]), 256)
    negative = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1))
    before = dict(student.attn_processors)
    with torch.no_grad():
        plain = student(x, t, timestep_cond=w, **text).sample
        with negative_away(student, negative, 0.0):
            off = student(x, t, timestep_cond=w, **text).sample
        with negative_away(student, negative, 1.0):
            steered = student(x, t, timestep_cond=w, **text).sample
    assert torch.allclose(off, plain, atol=1e-6)  # scale 0: the UNet's own output
    assert (steered - plain).abs().max() > 1e-3  # the negative prompt changes the output
    assert student.attn_processors == before  # restored
    with pytest.raises(WorkbenchError, match="from 0 to 2"):
        check_scale(-1.0)


def test_pooled_steering_takes_out_the_prompts_content_along_the_negative():
    from workbench.negative import pooled_negative

    gen = torch.Generator().manual_seed(3)
    empty, negative, other = (torch.randn(1, 8, generator=gen) for _ in range(3))
    d = (negative - empty) / (negative - empty).norm()
    aside = other - ((other - empty) @ d.T) * d  # content orthogonal to the negative's direction
    pooled = torch.cat([aside + 2.0 * d, aside])
    neg = pooled_negative(negative, empty)
    assert torch.allclose(neg.steer(pooled, 0.0), pooled)  # scale 0: off
    assert torch.allclose(neg.steer(pooled, 1.0), torch.cat([aside, aside]), atol=1e-5)  # none left
    assert torch.allclose(neg.steer(pooled, 2.0)[0], aside - 2.0 * d, atol=1e-5)  # as much the other way
    with pytest.raises(WorkbenchError, match="one text encoder"):
        pooled_negative(negative, torch.zeros(1, 4))


def test_nasa_steers_the_pooled_embedding_of_sdxl_unets(lcd_parts):
    from workbench.negative import negative_away, pooled_negative

    _, student, _, batch = lcd_parts
    student = __import__("copy").deepcopy(student).eval()
    x, text = batch["consistency"]["latents"], batch["consistency"]["cond"]
    t, w = torch.tensor([500, 500]), guidance_embedding(torch.tensor([2.0, 2.0]), 256)
    gen = torch.Generator().manual_seed(2)
    negative = torch.randn(1, 4, 16, generator=gen)
    pooled = pooled_negative(torch.randn(1, 8, generator=gen), torch.randn(1, 8, generator=gen))
    added = text["added_cond_kwargs"]
    shifted = text | {"added_cond_kwargs": added | {"text_embeds": pooled.steer(added["text_embeds"], 1.5)}}
    with torch.no_grad():
        plain = student(x, t, timestep_cond=w, **text).sample
        with negative_away(student, negative, 0.0, pooled):
            off = student(x, t, timestep_cond=w, **text).sample
        with negative_away(student, negative, 1.5):
            attention_only = student(x, t, timestep_cond=w, **text).sample
            by_hand = student(x, t, timestep_cond=w, **shifted).sample
        with negative_away(student, negative, 1.5, pooled):
            both = student(x, t, timestep_cond=w, **text).sample
        with negative_away(student, negative, 0.0, pooled, pooled_scale=1.5):
            pooled_only = student(x, t, timestep_cond=w, **text).sample
    assert torch.allclose(off, plain, atol=1e-6)  # scale 0: off, the pooled embedding too
    assert (both - attention_only).abs().max() > 1e-3  # the pooled embedding is steered
    assert torch.allclose(both, by_hand, atol=1e-5)  # ... by PooledNegative.steer, at the scale
    assert (pooled_only - plain).abs().max() > 1e-3 and (pooled_only - both).abs().max() > 1e-3
    assert not student._forward_pre_hooks  # the hook is gone afterwards
    with (
        pytest.raises(WorkbenchError, match="added_cond_kwargs"),
        negative_away(student, negative, 1.0, pooled),
    ):
        student(x, t, text["encoder_hidden_states"], timestep_cond=w)
    assert not student._forward_pre_hooks  # gone after an error too


def test_nasa_refuses_a_pooled_direction_for_a_unet_without_one(tiny_sd15_teacher):
    from workbench.negative import negative_away, pooled_negative, takes_pooled

    assert not takes_pooled(tiny_sd15_teacher)
    with pytest.raises(WorkbenchError, match="no pooled text embedding"):
        with negative_away(
            tiny_sd15_teacher, torch.zeros(1, 4, 16), 1.0, pooled_negative(*torch.ones(2, 1, 8))
        ):
            pass


def test_a_negative_prompt_changes_a_guidance_free_sample(pipe):
    from workbench.sampling import generate

    kw = {"steps": 2, "guidance": 1.0, "height": 32, "width": 32}
    plain, negative = (
        generate(pipe, ["a red circle"], [0], negative_prompt=n, **kw)[0] for n in (None, "red")
    )
    diff = np.abs(np.asarray(plain, dtype=float) - np.asarray(negative, dtype=float)).max()
    assert diff > 0  # without guidance the pipeline would ignore it; NASA puts it in the attention
    assert (
        type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__
        != "NegativeAwayProcessor"
    )
    assert not pipe.unet._forward_pre_hooks  # the pooled steering is gone too
    off, pooled_only = (
        generate(
            pipe, ["a red circle"], [0], negative_prompt="red", nasa_scale=0.0, nasa_pooled_scale=p, **kw
        )[0]
        for p in (0.0, 2.0)
    )
    assert np.array_equal(np.asarray(off), np.asarray(plain))  # both scales 0: no negative prompt at all
    assert not np.array_equal(np.asarray(pooled_only), np.asarray(plain))  # the pooled embedding alone acts


def test_a_failed_unet_swap_puts_the_scheduler_back(pipe):
    """A student that cannot be moved onto the pipeline (here: weights on the meta device)
    must leave the pipeline's own scheduler and UNet in place."""
    from workbench.catalog import meta_unet
    from workbench.sampling import generate

    scheduler, unet = pipe.scheduler, pipe.unet
    broken = meta_unet(dict(pipe.unet.config)).half()  # another dtype: generate moves a copy
    with pytest.raises(NotImplementedError):
        generate(pipe, ["a red circle"], [0], steps=1, guidance=1.0, unet=broken, scheduler="lcm")
    assert pipe.scheduler is scheduler and pipe.unet is unet
