"""Latency profile, estimate and measurement on tiny real UNets (no timed assertions)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from workbench import latency
from workbench.catalog import REST, build_catalog
from workbench.cli import main
from workbench.cost import unet_flops
from workbench.models import Base
from workbench.plan import PruningPlan
from workbench.presets import load_preset
from workbench.surgery import compile_plan

RES = 64  # tiny SDXL topology: multiple of 32 px, latent 8x8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "latency-cache"
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_teacher):
    path = tmp_path_factory.mktemp("latency-teacher")
    tiny_teacher.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_base(teacher_dir, tiny_config):
    # The folder's weights with the fixture's config: catalog and FLOP counts (cached per
    # config) are then shared by every test here, which keeps the suite fast.
    return Base("tiny", "unet", teacher_dir, tiny_config, 8)


@pytest.fixture(scope="module")
def profile(tiny_base, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("profile-cache")))
        return latency.get_profile(tiny_base, dtype="fp32", resolution=RES)


def test_instrumented_pass_times_every_atom_once_and_adds_up(tiny_teacher, tiny_config):
    setup = latency.latency_setup(Base("t", "unet", "", tiny_config, 8), dtype="fp32", resolution=RES)
    atoms = [a for a in build_catalog(tiny_config).atom_params if a != REST]
    clock = latency._Clock("cpu")
    with torch.inference_mode():
        whole, parts = latency.instrumented_pass(
            tiny_teacher, latency._inputs(setup, tiny_config), atoms, clock
        )
    assert set(parts) == {*atoms, REST}
    assert all(t >= 0 for t in parts.values())  # shells minus their blocks, rest minus all atoms
    assert sum(parts.values()) == pytest.approx(whole, rel=1e-9)


def test_profile_parts_add_up_to_the_measured_whole(profile, tiny_config):
    assert set(profile.atom_s) == set(build_catalog(tiny_config).atom_params)
    assert all(t >= 0 for t in profile.atom_s.values())
    assert sum(profile.atom_s.values()) == pytest.approx(profile.teacher_s, rel=1e-6)
    assert profile.parts_scale > 0
    assert profile.weights == "loaded" and profile.resolution == RES and profile.dtype == "fp32"
    assert profile.teacher_flops == unet_flops(build_catalog(tiny_config).config, RES)  # same FLOP cache key


def test_estimate_of_the_empty_plan_is_the_teacher(profile, tiny_config):
    catalog = build_catalog(tiny_config)
    spec = compile_plan(catalog, PruningPlan.empty(catalog))
    assert profile.estimate(spec.removed_atoms) == profile.teacher_s
    est = latency.estimate_plan(profile, spec)
    assert est["estimated_student_s"] == est["teacher_s"] == profile.teacher_s
    assert est["estimated_speedup"] == est["flops_ratio"] == 1.0


def test_estimate_removes_exactly_the_removed_atoms(profile, tiny_config):
    spec = compile_plan(build_catalog(tiny_config), load_preset("segmind-vega"))
    est = latency.estimate_plan(profile, spec)
    kept = sum(t for a, t in profile.atom_s.items() if a not in spec.removed_atoms)
    assert est["estimated_student_s"] == pytest.approx(kept, rel=1e-9)
    assert 0 < est["estimated_student_s"] < profile.teacher_s
    assert est["student_flops"] == unet_flops(spec.config, RES)  # per-atom FLOPs are exact
    assert est["student_params"] == spec.student_params
    with pytest.raises(latency.WorkbenchError, match="another model"):
        profile.estimate({"down_blocks.9.resnets.0"})


def test_profile_is_cached_and_keyed_by_dtype_and_resolution(tiny_base, cache):
    messages = []
    assert latency.cached_profile(tiny_base, dtype="fp32", resolution=RES) is None  # never measures
    first = latency.get_profile(tiny_base, dtype="fp32", resolution=RES)
    path = Path(first.path)
    assert path.parent == cache / "latency"
    assert latency.cached_profile(tiny_base, dtype="fp32", resolution=RES).to_dict() == first.to_dict()
    mtime = path.stat().st_mtime_ns
    again = latency.get_profile(
        tiny_base, dtype="fp32", resolution=RES, progress=lambda f, m: messages.append(m)
    )
    assert not first.from_cache and again.from_cache
    assert again.path == first.path and path.stat().st_mtime_ns == mtime
    assert again.to_dict() == first.to_dict()
    assert messages and all("cache" in m for m in messages)  # no warm-up, no profiling pass
    other_dtype = latency.get_profile(tiny_base, dtype="bf16", resolution=RES)
    other_res = latency.get_profile(tiny_base, dtype="fp32", resolution=2 * RES)
    assert not other_dtype.from_cache and not other_res.from_cache
    assert len({first.path, other_dtype.path, other_res.path}) == 3
    assert len(list((cache / "latency").glob("*.json"))) == 3  # the cache's layout: <root>/latency/
    refreshed = latency.get_profile(tiny_base, dtype="fp32", resolution=RES, refresh=True)
    assert not refreshed.from_cache and refreshed.path == first.path


def test_a_profile_shipped_with_the_model_is_read_when_this_machine_has_none(
    profile, teacher_dir, tiny_config, tmp_path
):
    folder = Path(shutil.copytree(teacher_dir, tmp_path / "model"))
    base = Base("tiny", "unet", str(folder), tiny_config, 8)  # the profile fixture's model, in another folder
    assert latency.cached_profile(base, dtype="fp32", resolution=RES) is None
    shipped = folder / "latency" / f"cpu-fp32-{RES}px-b1.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps(profile.to_dict()))
    got = latency.cached_profile(base, dtype="fp32", resolution=RES)
    assert got.shipped and got.to_dict() == profile.to_dict()
    assert latency.cached_profile(base, dtype="bf16", resolution=RES) is None  # only what was shipped
    other = Base("other", "unet", str(folder), tiny_config, 8)  # another model: not its profile
    assert latency.cached_profile(other, dtype="fp32", resolution=RES) is None
    own = latency.get_profile(base, dtype="fp32", resolution=RES)  # Profile times this machine
    assert not own.shipped and not own.from_cache
    assert not latency.cached_profile(base, dtype="fp32", resolution=RES).shipped  # and wins from then on


def test_weightless_base_is_profiled_with_random_weights(tiny_config):
    base = Base("tiny-builtin", "builtin", "", tiny_config, 8)
    profile = latency.get_profile(base, dtype="bf16", resolution=RES)
    assert profile.weights == "random" and profile.teacher_s > 0
    unet = latency.random_unet(tiny_config, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in unet.parameters())
    setup = latency.latency_setup(base, dtype="bf16", resolution=RES)
    with torch.inference_mode():
        out = latency._forward(unet, latency._inputs(setup, tiny_config))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_cli_latency_json(capsys, teacher_dir):
    argv = ["latency", "--base", teacher_dir, "--preset", "ssd-1b", "--resolution", str(RES)]
    argv += ["--dtype", "fp32", "--repeats", "2", "--warmup", "1", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    keys = {"device", "dtype", "resolution", "teacher_s", "student_s", "speedup", "flops_ratio"}
    keys |= {"estimated_student_s", "estimate_error", "teacher_spread", "student_spread"}
    assert keys <= set(data)
    assert data["device"] == "cpu" and data["resolution"] == RES and len(data["student_times"]) == 2
    assert data["teacher_s"] > 0 and data["student_s"] > 0
    ratios = sorted(t / s for t, s in zip(data["teacher_times"], data["student_times"]))
    assert data["speedup"] == pytest.approx((ratios[0] + ratios[1]) / 2)  # median of round ratios
    assert data["flops_ratio"] == pytest.approx(1.59, abs=0.05)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "fp16"], "fp16 is not supported on CPU"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--resolution", "500"], "multiple of 32"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--repeats", "0"], "at least 1"),
        (["--preset", "no-such-plan"], "unknown preset"),
    ],
)
def test_cli_latency_errors(capsys, teacher_dir, extra, message):
    assert main(["latency", "--base", teacher_dir, "--preset", "ssd-1b", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    assert main(["latency", "--base", "sdxl-base", "--preset", "ssd-1b", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
