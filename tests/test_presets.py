"""Every preset reproduces its published UNet exactly on SDXL's real config (meta device)."""

import json
from pathlib import Path

import pytest

from workbench.catalog import build_catalog, meta_unet
from workbench.cost import atom_flops, flops_without, unet_flops
from workbench.presets import load_preset
from workbench.surgery import compile_plan
from workbench.topology import topology_of

REFERENCE = Path(__file__).parent / "reference"
EXPECTED = {
    "sdxl-base": 2_567_463_684,
    "ssd-1b": 1_331_334_404,
    "segmind-vega": 745_225_604,
    "koala-1b": 1_161_184_324,
    "koala-700m": 782_822_724,
}
STRUCTURAL = {"down_block_types", "up_block_types", "layers_per_block", "mid_block_type",
              "transformer_layers_per_block", "reverse_transformer_layers_per_block"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_matches_reference(name, sdxl_config):
    reference = json.loads((REFERENCE / f"{name}-unet.json").read_text())
    spec = compile_plan(build_catalog(sdxl_config), load_preset(name))
    assert spec.notes == ()  # presets spell out every unit: no defaults applied
    assert spec.student_params == EXPECTED[name]
    assert sum(p.numel() for p in meta_unet(spec.config).parameters()) == EXPECTED[name]
    # Same layers, depths and mid block; diffusers may spell equal structures differently
    # (Vega's reference writes per-layer lists where ints suffice).
    assert topology_of(spec.config) == topology_of(reference)
    for key in set(reference) - STRUCTURAL:
        if not key.startswith("_"):
            assert spec.config.get(key) == reference[key], key


@pytest.mark.parametrize("name", ["ssd-1b", "segmind-vega"])
def test_student_flops_exact(name, sdxl_config):
    catalog = build_catalog(sdxl_config)
    spec = compile_plan(catalog, load_preset(name))
    counted = unet_flops(spec.config, 512)
    assert counted == flops_without(atom_flops(catalog, 512), spec.removed_atoms)
    assert unet_flops(sdxl_config, 512) == pytest.approx(1.589e12, rel=1e-3)
    assert counted == pytest.approx({"ssd-1b": 0.980e12, "segmind-vega": 0.663e12}[name], rel=1e-3)


def test_ssd1b_layer_loss_has_26_terms(sdxl_config):
    spec = compile_plan(build_catalog(sdxl_config), load_preset("ssd-1b"))
    assert len(spec.feature_pairs("layer")) == 26  # as in the SSD-1B paper


# BK-SDM (arXiv 2305.15798) on SD 1.x (SD 1.4 and 1.5 share this UNet config: 859,520,964
# params) and SD 2.x (865,910,724): the published v1 students' counts, and the v2 ones
# from the same removals on SD 2.1's config (block_out_channels and head dims lose the
# innermost entry for Tiny).
BK_SDM = {
    ("sd15-base", "bk-sdm-base"): 579_384_964,
    ("sd15-base", "bk-sdm-small"): 482_346_884,
    ("sd15-base", "bk-sdm-tiny"): 323_384_964,
    ("sd21-base", "bk-sdm-base"): 583_480_964,
    ("sd21-base", "bk-sdm-small"): 485_787_524,
    ("sd21-base", "bk-sdm-tiny"): 326_825_604,
}


@pytest.mark.parametrize("base, name", sorted(BK_SDM))
def test_bk_sdm_presets_count_exactly(base, name):
    from workbench.models import resolve_base

    config = resolve_base(base).unet_config
    spec = compile_plan(build_catalog(config), load_preset(name))
    assert spec.notes == ()  # the preset names every up layer: nothing applied by default
    assert spec.student_params == BK_SDM[(base, name)]
    assert sum(p.numel() for p in meta_unet(spec.config).parameters()) == BK_SDM[(base, name)]
    assert spec.config["layers_per_block"] == 1
    assert spec.config["mid_block_type"] == (None if name != "bk-sdm-base" else "UNetMidBlock2DCrossAttn")
    tiny = name == "bk-sdm-tiny"
    assert spec.config["block_out_channels"] == ([320, 640, 1280] if tiny else [320, 640, 1280, 1280])
    assert spec.config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ([] if tiny else ["DownBlock2D"])
    if base == "sd21-base":
        assert spec.config["attention_head_dim"] == [5, 10, 20, 20][: 3 if tiny else 4]
    # BK-SDM's up stages keep their first and last layer
    last = len(spec.config["block_out_channels"]) - 1
    assert spec.layer_map[f"up_blocks.{last}.resnets.1"] == "up_blocks.3.resnets.2"
    assert spec.layer_map[f"up_blocks.{last}.resnets.0"] == "up_blocks.3.resnets.0"


@pytest.mark.parametrize(
    "removed", [["down_blocks.3"], ["down_blocks.2"], ["down_blocks.3", "down_blocks.2.layers.1"]]
)
def test_flops_stay_exact_when_a_whole_stage_moves_the_inner_atoms(removed):
    """Without the stage's sampler the inner stages and the mid block run at twice the side."""
    from workbench.cost import atom_flops, student_flops
    from workbench.plan import PruningPlan
    from workbench.testing import tiny_sd15_config

    config = tiny_sd15_config()  # [8, 16, 16, 16]: the two inner stages may go whole
    catalog = build_catalog(config)
    spec = compile_plan(catalog, PruningPlan.empty(catalog).with_removed(removed))
    per_atom = atom_flops(catalog, 128, 8)
    exact = student_flops(spec, per_atom, lambda d: atom_flops(catalog, 128 * 2**d, 8))
    assert exact == unet_flops(spec.config, 128, 8)
    assert flops_without(per_atom, spec.removed_atoms) < exact  # the per-atom sum alone undercounts


def test_a_flops_budget_counts_a_whole_stage_removal_exactly():
    from workbench.autoprune import budget
    from workbench.plan import PruningPlan
    from workbench.testing import tiny_sd15_config

    config = tiny_sd15_config()
    catalog = build_catalog(config)
    spec = compile_plan(catalog, PruningPlan.empty(catalog).with_removed(["down_blocks.3"]))
    flops = budget("flops", 0.9, catalog, resolution=128)
    assert flops.fraction(spec) == pytest.approx(unet_flops(spec.config, 128, 8) / unet_flops(config, 128, 8))
    assert budget("params", 0.9, catalog).fraction(spec) == spec.student_params / spec.teacher_params
