from collections import Counter

from workbench.catalog import REST, build_catalog, meta_unet
from workbench.models import resolve_base
from workbench.testing import tiny_sd15_config


def _module_params(model, path):
    return sum(p.numel() for p in model.get_submodule(path).parameters())


def test_sdxl_catalog_counts_exactly(sdxl_config):
    catalog = build_catalog(sdxl_config)
    assert catalog.total_params == 2_567_463_684
    kinds = Counter(u.kind for u in catalog.units)
    # 3 + 3 down/up stages: 6 + 9 layers; depths 2x2 + 10x2 down, 2x3 + 10x3 up, mid 10
    assert kinds == {"layer": 15, "transformer_block": 4 + 20 + 6 + 30 + 10, "stage_attention": 4,
                     "mid_block": 1, "mid_attention": 1, "stage": 3}  # fmt: skip


def test_units_plus_rest_equal_total(sdxl_config):
    catalog = build_catalog(sdxl_config)
    covered = set().union(*(u.atoms for u in catalog.units))
    assert covered | {REST} == set(catalog.atom_params)
    assert sum(catalog.atom_params[a] for a in covered) + catalog.rest_params == catalog.total_params


def test_unit_params_match_real_modules(sdxl_config):
    catalog = build_catalog(sdxl_config)
    model = meta_unet(sdxl_config)
    by_id = catalog.by_id
    layer = by_id["down_blocks.2.layers.1"].params
    assert layer == _module_params(model, "down_blocks.2.resnets.1") + _module_params(
        model, "down_blocks.2.attentions.1"
    )
    block = "up_blocks.0.attentions.2.transformer_blocks.9"
    assert by_id[block].params == _module_params(model, block)
    assert by_id["mid_block"].params == _module_params(model, "mid_block")
    assert by_id["mid_block.attentions.0"].params == _module_params(
        model, "mid_block.attentions.0"
    ) + _module_params(model, "mid_block.resnets.1")
    assert by_id["down_blocks.1.attentions"].params == _module_params(model, "down_blocks.1.attentions")


def test_sd15_topology_catalogs():
    catalog = build_catalog(resolve_base("sd15-base").unet_config)
    assert catalog.total_params == 859_520_964  # SD 1.5's published UNet size
    assert "down_blocks.3.attentions" not in catalog.by_id  # last down stage has no attention
    assert "up_blocks.0.attentions" not in catalog.by_id
    assert "up_blocks.3.attentions.2.transformer_blocks.0" in catalog.by_id
    tiny = build_catalog(tiny_sd15_config())
    assert [u.id for u in tiny.units if u.kind == "layer"][:2] == [
        "down_blocks.0.layers.0",
        "down_blocks.0.layers.1",
    ]


def test_stage_unit_is_a_stage_pair_and_its_samplers():
    config = resolve_base("sd15-base").unet_config
    catalog = build_catalog(config)
    model = meta_unet(config)
    inner = catalog.by_id["down_blocks.3"]
    assert inner.kind == "stage"
    # the innermost stage has no downsampler: the one leading into it goes
    assert inner.params == sum(
        _module_params(model, p) for p in ("down_blocks.3", "up_blocks.0", "down_blocks.2.downsamplers")
    )
    # the outermost up stage has no upsampler: the one of the up stage before it goes
    outer = catalog.by_id["down_blocks.0"]
    assert outer.params == sum(
        _module_params(model, p) for p in ("down_blocks.0", "up_blocks.3", "up_blocks.2.upsamplers")
    )
    assert catalog.atom_params["up_blocks.0.upsamplers.0"] == _module_params(
        model, "up_blocks.0.upsamplers.0"
    )
