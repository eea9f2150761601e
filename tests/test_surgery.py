import pytest
import torch
from diffusers import UNet2DConditionModel

from workbench.catalog import build_catalog, meta_unet
from workbench.cost import dummy_inputs
from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan
from workbench.presets import load_preset
from workbench.surgery import build_student, compile_plan, derive_stage_plan
from workbench.testing import tiny_sd15_config, tiny_unet

PRESETS = ["sdxl-base", "ssd-1b", "segmind-vega", "koala-1b", "koala-700m"]
SD_PRESETS = ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"]


def _out(unet, config, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return unet(**dummy_inputs(config, latent=8, batch=2)).sample


def _plan(config, removed):
    return PruningPlan.empty(build_catalog(config)).with_removed(removed)


def _assert_stock_diffusers_reloads(student, spec, folder):
    """Saved and loaded by stock diffusers: every key matches, the weights are identical and
    the output is the same (to rounding: weights mapped from the file sit at unaligned
    addresses, where CPU kernels may sum in another order, ~1e-6 on bk-sdm-base)."""
    assert sum(p.numel() for p in student.parameters()) == spec.student_params
    student.save_pretrained(folder)
    loaded, info = UNet2DConditionModel.from_pretrained(folder, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing/unexpected/mismatched keys
    assert sum(p.numel() for p in loaded.parameters()) == spec.student_params
    weights = student.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(
        _out(loaded.eval(), spec.config), _out(student, spec.config), rtol=0, atol=1e-5
    )


def _feature_pairs(spec, student, teacher, mode):
    """The student/teacher module pairs of a feature mode; each names a real module."""
    pairs = spec.feature_pairs(mode)
    assert pairs
    for s, t in pairs:
        student.get_submodule(s)
        teacher.get_submodule(t)
    return pairs


def test_empty_plan_gives_identical_outputs(tiny_teacher, tiny_config):
    student, spec = build_student(tiny_teacher, _plan(tiny_config, []))
    assert spec.student_params == spec.teacher_params
    assert torch.equal(_out(student, tiny_config), _out(tiny_teacher, tiny_config))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_student_roundtrips_with_stock_diffusers(name, tiny_teacher, tmp_path):
    _assert_stock_diffusers_reloads(*build_student(tiny_teacher, load_preset(name)), tmp_path)


@pytest.mark.parametrize("name", SD_PRESETS)
def test_sd_preset_student_roundtrips_with_stock_diffusers(name, tiny_sd15_teacher, tmp_path):
    _assert_stock_diffusers_reloads(*build_student(tiny_sd15_teacher, load_preset(name)), tmp_path)


def test_weights_follow_the_layer_map(tiny_teacher):
    student, spec = build_student(tiny_teacher, load_preset("ssd-1b"))
    # SSD-1B keeps blocks 0, 1, 2 and 5 of 10: student block 3 is teacher block 5.
    s = student.down_blocks[2].attentions[0].transformer_blocks[3].attn1.to_q.weight
    t = tiny_teacher.down_blocks[2].attentions[0].transformer_blocks[5].attn1.to_q.weight
    assert torch.equal(s, t)
    assert spec.layer_map["up_blocks.1.attentions.1.transformer_blocks.0"] == (
        "up_blocks.1.attentions.1.transformer_blocks.0"
    )
    with torch.no_grad():
        s.add_(1.0)  # the student owns its weights
    assert not torch.equal(s, t)


def test_removed_down_layer_removes_mirrored_up_layer(tiny_teacher, tiny_config):
    student, spec = build_student(tiny_teacher, _plan(tiny_config, ["down_blocks.2.layers.1"]))
    # up_blocks.0.layers.0 consumed down_blocks.2.layers.1's skip connection
    assert spec.auto_removed == ("up_blocks.0.layers.0",)
    assert "up_blocks.0.layers.0" in spec.notes[0]
    assert spec.config["layers_per_block"] == [2, 2, 1]
    assert _out(student, spec.config).shape == (2, 4, 8, 8)


def test_mirrored_default_respects_shapes(sdxl_config):
    # SDXL's up_blocks.1 first ResNet takes up_blocks.0's 1280 channels, the others 640:
    # the default must pick a middle layer instead of the skip mirror (layer 0).
    spec = compile_plan(build_catalog(sdxl_config), _plan(sdxl_config, ["down_blocks.1.layers.1"]))
    assert spec.auto_removed == ("up_blocks.1.layers.1",)


def test_mid_depth_follows_last_down_stage(tiny_teacher, tiny_config):
    removed = [f"down_blocks.2.attentions.0.transformer_blocks.{k}" for k in range(4, 10)]
    student, spec = build_student(tiny_teacher, _plan(tiny_config, removed))
    assert len(student.mid_block.attentions[0].transformer_blocks) == 4
    assert spec.auto_removed[-1] == "mid_block.attentions.0.transformer_blocks.9"
    assert any("mid block's depth" in n for n in spec.notes)


@pytest.mark.parametrize(
    "removed, kind",
    [(["mid_block"], type(None)), (["mid_block.attentions.0"], "UNetMidBlock2D"),
     (["down_blocks.1.attentions", "up_blocks.1.attentions"], None)],
)  # fmt: skip
def test_mid_and_stage_attention_options(removed, kind, tiny_teacher, tiny_config):
    student, spec = build_student(tiny_teacher, _plan(tiny_config, removed))
    if kind is type(None):
        assert student.mid_block is None
    elif kind:
        assert type(student.mid_block).__name__ == kind
    else:
        assert spec.config["down_block_types"][1] == "DownBlock2D"
    assert sum(p.numel() for p in student.parameters()) == spec.student_params
    assert torch.isfinite(_out(student, spec.config)).all()


@pytest.mark.parametrize(
    "removed, message",
    [
        (["down_blocks.1.layers.0", "down_blocks.1.layers.1"], "at least one layer per stage"),
        (["down_blocks.1.layers.0"], r"takes 16 input channels where the first ResNet of down_blocks.1 takes 8; remove down_blocks.1.layers.1 instead"),
        (["up_blocks.0.layers.1"], "can only lose as many layers as its mirrored down stage down_blocks.2"),
        ([f"down_blocks.1.attentions.0.transformer_blocks.{k}" for k in range(2)],
         r"transformer depth of 0 .* remove the stage's attention as a whole \(down_blocks.1.attentions\)"),
        (["mid_block.attentions.0.transformer_blocks.0"], "diffusers ties the mid block's depth"),
    ],
)  # fmt: skip
def test_impossible_plans_are_rejected_precisely(removed, message, tiny_config):
    with pytest.raises(WorkbenchError, match=message):
        compile_plan(build_catalog(tiny_config), _plan(tiny_config, removed))


def test_plan_for_another_topology_and_unknown_units(tiny_config):
    sd15 = build_catalog(tiny_sd15_config())
    with pytest.raises(WorkbenchError, match="made for another UNet topology"):
        compile_plan(sd15, load_preset("ssd-1b"))
    with pytest.raises(WorkbenchError, match="unknown units.*did you mean 'mid_block'"):
        compile_plan(build_catalog(tiny_config), _plan(tiny_config, ["mid_blok"]))


def test_sd15_student_one_layer_less_per_stage(tmp_path):
    config = tiny_sd15_config()
    teacher = tiny_unet(config)
    removed = [f"down_blocks.{i}.layers.1" for i in range(4)]
    student, spec = build_student(teacher, _plan(config, removed))
    assert spec.config["layers_per_block"] == 1 and len(spec.auto_removed) == 4
    _assert_stock_diffusers_reloads(student, spec, tmp_path)


@pytest.mark.parametrize("mode", ["layer", "block", "self-attention"])
def test_feature_pairs_name_real_modules(mode, tiny_teacher):
    student, spec = build_student(tiny_teacher, load_preset("koala-1b"))
    _feature_pairs(spec, student, tiny_teacher, mode)
    with pytest.raises(WorkbenchError, match="unknown feature mode"):
        spec.feature_pairs("everything")


# --------------------------------------------------------------------------- whole stages


def test_innermost_stage_removal_inherits_the_remaining_stages(tmp_path):
    config = tiny_sd15_config()  # block_out_channels [8, 16, 16, 16]
    teacher = tiny_unet(config)
    student, spec = build_student(teacher, _plan(config, ["down_blocks.3"]))
    assert spec.config["block_out_channels"] == [8, 16, 16]
    assert spec.config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert spec.config["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    # the teacher's up_blocks.1 is the student's up_blocks.0, upsampler included
    assert spec.layer_map["up_blocks.0.attentions.2"] == "up_blocks.1.attentions.2"
    assert spec.layer_map["up_blocks.0.upsamplers.0"] == "up_blocks.1.upsamplers.0"
    assert "down_blocks.2.downsamplers.0" not in spec.layer_map.values()  # the sampler into the stage
    for s, t in [("up_blocks.0.resnets.2.conv1.weight", "up_blocks.1.resnets.2.conv1.weight"),
                 ("up_blocks.0.upsamplers.0.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
                 ("down_blocks.1.downsamplers.0.conv.weight", "down_blocks.1.downsamplers.0.conv.weight")]:  # fmt: skip
        assert torch.equal(student.get_parameter(s), teacher.get_parameter(t))
    _assert_stock_diffusers_reloads(student, spec, tmp_path)


@pytest.mark.parametrize("mode", ["layer", "block", "self-attention"])
def test_feature_pairs_follow_a_removed_stage(mode):
    config = tiny_sd15_config()
    teacher = tiny_unet(config)
    student, spec = build_student(teacher, load_preset("bk-sdm-tiny"))
    pairs = _feature_pairs(spec, student, teacher, mode)
    if mode == "block":
        # up_blocks.0 keeps its upsampler; down_blocks.2 lost its downsampler: compared before it
        assert ("up_blocks.0", "up_blocks.1") in pairs and (
            "down_blocks.2.attentions.0",
            "down_blocks.2.attentions.0",
        ) in pairs
    assert not any("samplers" in s for s, _ in pairs)


def test_stage_and_layer_counts_are_exact_for_every_stage():
    config = tiny_sd15_config()
    catalog = build_catalog(config)
    built = []
    for unit in (u for u in catalog.units if u.kind == "stage"):
        try:
            spec = compile_plan(catalog, _plan(config, [unit.id, "down_blocks.0.layers.1"]))
        except WorkbenchError as err:
            assert "removable alone here: down_blocks.2, down_blocks.3" in str(err)
            continue
        built.append(unit.id)
        assert sum(p.numel() for p in meta_unet(spec.config).parameters()) == spec.student_params
        assert spec.teacher_params - spec.student_params == unit.params + catalog.by_id[
            "down_blocks.0.layers.1"].params + catalog.by_id["up_blocks.3.layers.1"].params  # fmt: skip
    assert built == ["down_blocks.2", "down_blocks.3"]


@pytest.mark.parametrize(
    "config, removed, message",
    [
        ("sdxl", ["down_blocks.2"], r"the mid block works at 1280 channels but would follow a stage of 640"),
        ("sdxl", ["down_blocks.2", "mid_block"], r"up_blocks.1.resnets.0 takes 1920 input channels but would get 1280"),
        ("sdxl", ["down_blocks.0"], r"conv_in, the time embedding and conv_out work at 320 channels"),
        ("tiny-sd15", ["down_blocks.1"], r"down_blocks.2.resnets.0 takes 16 input channels but would get 8.*removable alone here: down_blocks.2, down_blocks.3"),
        ("tiny-sd15", [f"down_blocks.{i}" for i in range(4)], "removing every stage leaves no UNet"),
    ],
)  # fmt: skip
def test_stage_removal_diffusers_cannot_build_is_refused(config, removed, message, sdxl_config):
    config = sdxl_config if config == "sdxl" else tiny_sd15_config()
    with pytest.raises(WorkbenchError, match=message) as err:
        compile_plan(build_catalog(config), _plan(config, removed))
    if config is sdxl_config:
        assert "removable alone here: no stage" in str(err.value)


def test_progressive_stages_reach_a_removed_stage():
    config = tiny_sd15_config()
    catalog = build_catalog(config)
    small, tiny = (compile_plan(catalog, load_preset(n)) for n in ("bk-sdm-small", "bk-sdm-tiny"))
    step = derive_stage_plan(small, tiny, name="stage-2")
    assert "down_blocks.3" in step.removed
    teacher = tiny_unet(config)
    previous, _ = build_student(teacher, small.plan)
    student, _ = build_student(previous, step)
    direct, _ = build_student(teacher, tiny.plan)
    assert torch.equal(_out(student, tiny.config), _out(direct, tiny.config))
