"""Where a run's teacher pipeline waits between uses (``models.TeacherPipeline``): on a CPU
run the parts it has done with leave memory and come back from the base's files; sampling a
student works with the teacher's UNet away."""

from __future__ import annotations

import pytest
import torch

from workbench.models import ENCODERS, TeacherPipeline, freeze_pipeline, load_pipeline, resolve_base
from workbench.sampling import generate
from workbench.testing import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_parts_set_aside_on_the_cpu_leave_memory_and_come_back_whole(tiny_pipeline_dir):
    pipe = freeze_pipeline(load_pipeline(tiny_pipeline_dir))
    before = {name: _state(getattr(pipe, name)) for name in (*ENCODERS, "unet")}
    parts = TeacherPipeline(pipe, resolve_base(tiny_pipeline_dir), torch.device("cpu"), min_bytes=0)
    parts.set_aside(*ENCODERS, "unet")
    for name in (*ENCODERS, "unet"):
        assert all(p.device.type == "meta" for p in getattr(pipe, name).parameters()), name
    assert set(parts.away) == {*ENCODERS, "unet"}
    with parts.using(*ENCODERS) as back:
        assert back is pipe and all(getattr(pipe, n).device.type == "cpu" for n in ENCODERS)
        for name in ENCODERS:
            module = getattr(pipe, name)
            assert not module.training and not any(p.requires_grad for p in module.parameters())
            for key, value in module.state_dict().items():
                torch.testing.assert_close(value, before[name][key], rtol=0, atol=0)
    assert all(next(getattr(pipe, n).parameters()).device.type == "meta" for n in ENCODERS)  # away again
    parts.bring_back("unet")
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, before["unet"][key], rtol=0, atol=0)
    assert set(parts.away) == set(ENCODERS)


def test_a_student_draws_while_the_teacher_unet_is_away(tiny_pipeline_dir, tiny_config):
    pipe = freeze_pipeline(load_pipeline(tiny_pipeline_dir))
    student = tiny_unet(dict(pipe.unet.config), seed=3).eval()
    kw = {"steps": 2, "guidance": 2.0}
    with_teacher_here = generate(pipe, ["a red square"], [0], unet=student, **kw)
    parts = TeacherPipeline(pipe, resolve_base(tiny_pipeline_dir), torch.device("cpu"), min_bytes=0)
    parts.set_aside("unet")
    away = generate(pipe, ["a red square"], [0], unet=student, **kw)
    assert next(pipe.unet.parameters()).device.type == "meta"  # put back as it was: away
    assert list(away[0].getdata()) == list(with_teacher_here[0].getdata())


def test_beside_an_accelerator_parts_are_parked_not_dropped(tiny_pipeline_dir):
    """Parts set aside beside a GPU wait on the CPU (nothing is reloaded); ``using`` leaves a
    part that was already on the device where it is."""
    pipe = freeze_pipeline(load_pipeline(tiny_pipeline_dir))
    parts = TeacherPipeline(pipe, resolve_base(tiny_pipeline_dir), torch.device("cuda"))
    parts.set_aside(*ENCODERS)  # on the CPU already: nothing moves, nothing is dropped
    assert not parts.away and next(pipe.vae.parameters()).device.type == "cpu"
    assert parts.for_student() == ("unet", "vae", "text_encoder", "text_encoder_2")
    assert TeacherPipeline(pipe, None, torch.device("cpu")).for_student() == ENCODERS


def test_small_parts_stay_in_memory_on_the_cpu(tiny_pipeline_dir):
    """Below ``min_bytes`` reading a part again costs more than it frees: the toy's stay."""
    pipe = freeze_pipeline(load_pipeline(tiny_pipeline_dir))
    parts = TeacherPipeline(pipe, resolve_base(tiny_pipeline_dir), torch.device("cpu"))
    assert not any(parts.drops(n) for n in (*ENCODERS, "unet"))
    parts.set_aside(*ENCODERS, "unet")
    assert not parts.away and next(pipe.unet.parameters()).device.type == "cpu"
    unet_bytes = sum(p.numel() * 4 for p in pipe.unet.parameters())
    assert TeacherPipeline(pipe, resolve_base(tiny_pipeline_dir), torch.device("cpu"), min_bytes=unet_bytes).drops("unet")
