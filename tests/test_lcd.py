"""Few-step students: LCM sampling, w-conditioning, latent consistency distillation."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.schedulers import check_sampler, guidance_embedding, make_scheduler
from workbench.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(tiny_pipeline(tmp_path_factory.mktemp("lcd") / "pipe", perturb=True))


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


def test_compare_samples_the_student_with_its_own_scheduler(base):
    from workbench.ui import compare_tab, plan_view
    from workbench.ui.settings import Limits
    from workbench.ui.store import Store

    store, view = Store(), plan_view.new_view(base, 64)
    teacher, student, summary = compare_tab.compare(
        store, Limits(), view, [], "a red circle", "", "3", 2, 2.0, 32,
        student_scheduler="lcm", student_steps=1,
    )  # fmt: skip
    assert len(teacher) == len(student) == 1 and "student: 1 lcm steps" in summary
    assert type(store.pipeline(base).scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(WorkbenchError, match="1 to 8 steps"):
        compare_tab.validate(store, base, Limits(), "a", "", "0", 20, 2.0, None, "lcm", None)
