"""One disk cache: one root, one layout (``<root>/latency``, ``<root>/sensitivity``, ...), and
one atomic write that never leaves half a file."""

import json

import pytest

from workbench import cache, latency, sensitivity
from workbench.files import atomic_write, write_json_atomic
from workbench.models import resolve_base


def test_every_cache_lives_under_one_root(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "c"))
    toy = resolve_base("toy")
    assert cache.root() == tmp_path / "c"
    assert latency.profile_path(toy, "cpu", "fp32", 64, 1).parent == tmp_path / "c" / "latency"
    assert (
        sensitivity.map_path(toy, sensitivity.Calibration(), "cpu").parent == tmp_path / "c" / "sensitivity"
    )
    with pytest.raises(ValueError, match="unknown cache kind 'weights'"):
        cache.folder("weights")
    assert not (tmp_path / "c").exists()  # asking where creates nothing
    monkeypatch.delenv("WORKBENCH_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.folder("latency") == tmp_path / "home" / ".cache" / "sdxl-workbench" / "latency"


def test_entries_read_back_only_when_whole_and_of_their_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    entry = cache.path("sensitivity", "m.json")
    assert cache.read(entry, 1) is None  # missing
    cache.write(entry, {"schema": 1, "x": [1, 2]})
    assert cache.read(entry, 1) == {"schema": 1, "x": [1, 2]}
    assert cache.read(entry, 2) is None  # another schema: measured again
    entry.write_text('{"schema": 1, "x": [1,')  # half a file (not written by us)
    assert cache.read(entry, 1) is None
    assert [p.name for p in entry.parent.iterdir()] == ["m.json"]  # no temporary files left


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "status.json", {"state": "running"})

    def crash(tmp):
        tmp.write_text('{"state": "do')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_catalog_figures_are_remembered_per_config_and_read_back(tmp_path, monkeypatch, tiny_config):
    """Parameters and FLOPs per atom are counted once per UNet config (the count imports
    diffusers: seconds of an app's start), then read from ``<root>/figures``."""
    from workbench import catalog, cost

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    clear = (catalog._build_cached.cache_clear, cost._flops_cached.cache_clear)
    try:
        for c in clear:
            c()
        counted = catalog.build_catalog(tiny_config)
        flops = cost.flops_by_module(tiny_config, 8)
        entries = sorted((tmp_path / "figures").glob("*.json"))
        assert len(entries) == 2
        for entry in entries:  # mark every figure: a read-back returns the marked values
            data = json.loads(entry.read_text())
            value = data["value"]
            data["value"] = (
                {k: v + 1 for k, v in value.items()}
                if isinstance(value, dict)
                else [[k, v + 1] for k, v in value]
            )
            entry.write_text(json.dumps(data))
        for c in clear:
            c()
        again = catalog.build_catalog(tiny_config)
        assert again.atom_params == {k: v + 1 for k, v in counted.atom_params.items()}
        assert cost.flops_by_module(tiny_config, 8) == {k: v + 1 for k, v in flops.items()}
    finally:
        for c in clear:
            c()  # nothing marked outlives this test
