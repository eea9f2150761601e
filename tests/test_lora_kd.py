"""LoRA-enhanced distillation: where adapters go, what trains, and the merged export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench import lora_kd
from workbench.errors import WorkbenchError
from workbench.presets import load_preset
from workbench.surgery import build_student

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(config, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(batch, 5, config["cross_attention_dim"], generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g),
                              "time_ids": torch.randn(batch, 6, generator=g)},
    }  # fmt: skip


def test_changed_inputs_follow_the_plan(tiny_teacher):
    _, spec = build_student(tiny_teacher, load_preset("sdxl-base"))
    assert lora_kd.changed_input_atoms(spec) == []  # the empty plan changes no layer's input
    _, spec = build_student(tiny_teacher, load_preset("ssd-1b"))
    changed = lora_kd.changed_input_atoms(spec)
    # SSD-1B keeps 4 of 10 blocks in down_blocks.2 (teacher 0, 1, 2, 5): the 4th now follows block 2
    assert "down_blocks.2.attentions.0.transformer_blocks.3" in changed
    assert "down_blocks.2.attentions.0.transformer_blocks.1" not in changed
    assert "down_blocks.2.resnets.1" in changed  # it now follows teacher block 5, not 9


def test_adapters_train_where_inputs_held_and_merge_into_a_stock_student(tiny_teacher, tiny_config, tmp_path):
    from diffusers import UNet2DConditionModel

    student, spec = build_student(tiny_teacher, load_preset("ssd-1b"))
    reference = student(**_inputs(tiny_config)).sample
    info = lora_kd.add_adapters(student, spec, rank=2)
    torch.testing.assert_close(student(**_inputs(tiny_config)).sample, reference)  # LoRA B starts at zero
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n or any(n.startswith(a + ".") for a in info["full_atoms"]) for n in trainable
    )
    assert any(n.startswith("down_blocks.2.resnets.1.") and "lora_" not in n for n in trainable)
    assert info["trainable"] < 0.5 * spec.student_params
    with torch.no_grad():  # a trained adapter: non-zero corrections everywhere
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    adapted = student(**_inputs(tiny_config)).sample
    assert not torch.allclose(adapted, reference)
    plain = lora_kd.merged(student, spec)
    assert type(plain) is UNet2DConditionModel
    assert sum(p.numel() for p in plain.parameters()) == spec.student_params
    torch.testing.assert_close(plain(**_inputs(tiny_config)).sample, adapted, rtol=1e-4, atol=1e-5)
    # no second copy of the student: only the adapted layers' weights are new tensors
    own = {p.data_ptr() for p in student.parameters()}
    shared = [n for n, p in plain.named_parameters() if p.data_ptr() in own]
    assert len(shared) == len(list(plain.parameters())) - info["adapted_modules"]
    in_place = lora_kd.merged(student, spec, in_place=True)  # at the end of a stage: every tensor shared
    assert all(p.data_ptr() in own for p in in_place.parameters())
    torch.testing.assert_close(in_place(**_inputs(tiny_config)).sample, adapted, rtol=1e-4, atol=1e-5)
    plain.save_pretrained(tmp_path / "student")
    loaded, info = UNet2DConditionModel.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_rank_must_be_positive(tiny_teacher):
    student, spec = build_student(tiny_teacher, load_preset("ssd-1b"))
    with pytest.raises(WorkbenchError, match="LoRA rank must be a whole number >= 1, got 0"):
        lora_kd.add_adapters(student, spec, rank=0)


def test_a_lora_run_trains_adapters_and_exports_a_stock_student(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from workbench.distill import run_distillation
    from workbench.runs import RunDir, read_metrics
    from workbench.testing import run_config

    base = tiny_pipeline_dir
    config = run_config(base, steps=2, toy_samples=8, sample_steps=1, lora_rank=2)
    assert run_distillation(config, tmp_path / "run")["state"] == "done"
    rows, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    run = RunDir(tmp_path / "run")
    unet, info = UNet2DConditionModel.from_pretrained(run.student, output_loading_info=True)
    assert all(not v for v in info.values())  # merged: no adapter keys, nothing missing
    from workbench.surgery import student_spec

    spec = student_spec(json.loads((Path(base) / "unet" / "config.json").read_text()), load_preset("ssd-1b"))
    assert sum(p.numel() for p in unet.parameters()) == spec.student_params
