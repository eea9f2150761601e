import json
from pathlib import Path

import pytest

from workbench.catalog import build_catalog
from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan
from workbench.presets import list_presets, load_preset, save_preset


def test_roundtrip_and_frozen(tmp_path, tiny_config):
    plan = PruningPlan.empty(build_catalog(tiny_config)).with_removed(["mid_block", "down_blocks.1.layers.1"])
    path = plan.save(tmp_path / "p.json")
    again = PruningPlan.load(path)
    assert again == plan and again.removed == ("down_blocks.1.layers.1", "mid_block")
    with pytest.raises(AttributeError):
        plan.name = "x"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(extra=1), "unknown keys ['extra']"),
        (lambda d: d.pop("topology"), "missing keys ['topology']"),
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.update(removed="mid_block"), "'removed' must be a list"),
        (lambda d: d.update(removed=["mid_block", "mid_block"]), "lists units twice"),
        (lambda d: d.update(name=""), "non-empty 'name'"),
    ],
)
def test_strict_load(tmp_path, mutate, message):
    data = load_preset("ssd-1b").to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WorkbenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PruningPlan.load(path)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        PruningPlan.load(path)
    with pytest.raises(WorkbenchError, match="does not exist"):
        PruningPlan.load(tmp_path / "nope.json")


def test_presets_listed_and_saved(tmp_path, monkeypatch):
    assert {"sdxl-base", "ssd-1b", "segmind-vega", "koala-1b", "koala-700m"} <= set(list_presets())
    with pytest.raises(WorkbenchError, match="unknown preset 'nope'.*ssd-1b"):
        load_preset("nope")
    monkeypatch.setenv("WORKBENCH_PRESETS_DIR", str(tmp_path))
    ssd = load_preset(str(Path(__file__).parent.parent / "presets" / "ssd-1b.json"))
    save_preset(ssd, "mine")
    assert load_preset("mine").name == "mine"
    with pytest.raises(WorkbenchError, match="already exists"):
        save_preset(load_preset("mine"), "mine")
    with pytest.raises(WorkbenchError, match="not valid"):
        save_preset(load_preset("mine"), "../evil")
