"""The UI's handlers called as plain functions: SDXL's real config (meta device) and a tiny real pipeline."""

from __future__ import annotations

import json
import zipfile

import gradio as gr
import pytest

from workbench import presets
from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan
from workbench.testing import tiny_sdxl_config
from workbench.ui import blocks_tab, compare_tab, export_tab, model_box, plan_view, presets_tab
from workbench.ui import format as fmt
from workbench.ui.settings import AppSettings, Limits, parse_args
from workbench.ui.shared import inline_errors, user_errors
from workbench.ui.store import Store

SKIP = gr.skip()
SSD_1B = list(presets.load_preset("ssd-1b").removed)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl(store: Store) -> dict:
    """A session view on SDXL's config at 1024 px (the README's numbers)."""
    return plan_view.new_view("sdxl-base", 1024)


@pytest.fixture(scope="module")
def tiny_unet_dir(tmp_path_factory) -> str:
    """A UNet folder holding only a config: SDXL's topology at tiny widths (priced on meta)."""
    folder = tmp_path_factory.mktemp("tiny-unet")
    config = tiny_sdxl_config() | {"_class_name": "UNet2DConditionModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def numbers_of(outputs: tuple) -> str:
    return outputs[1]


# ------------------------------------------------------------------ formatting


def test_numbers_read_like_the_readme():
    assert fmt.params(2_567_463_684) == "2.57B"
    assert fmt.params(1_331_334_404) == "1.33B"
    assert fmt.params(87_100) == "87.1k"
    assert fmt.flops(6.761e12) == "6.76 TFLOPs"
    assert fmt.factor(6.761, 4.208, "fewer") == "1.61x fewer"
    assert fmt.factor(2.0, 2.0, "fewer") == "same"
    assert fmt.seconds(0.0123) == "12 ms" and fmt.seconds(2.5) == "2.50 s"


# ------------------------------------------------------------------ Blocks tab


def test_board_shows_every_unit_once_in_stage_order(store, sdxl):
    sections = blocks_tab.cached_board(store, "sdxl-base", 1024)
    ids = [uid for s in sections for row in s.rows for _, uid in row.choices]
    catalog = store.catalog("sdxl-base")
    assert len(ids) == len(catalog.units) == 94  # 91 + 3 whole stages
    assert set(ids) == set(catalog.by_id)
    assert [s.title.split(" ·")[0] for s in sections] == [
        "Down stage 0",
        "Down stage 1",
        "Down stage 2",
        "Mid block",
        "Up stage 0",
        "Up stage 1",
        "Up stage 2",
    ]


def test_board_labels_carry_params_and_flops(store):
    sections = blocks_tab.cached_board(store, "sdxl-base", 1024)
    deep = next(r for r in sections[2].rows if r.label.startswith("Layer 0"))
    assert "10 transformer blocks" in deep.label and "params" in deep.label and "FLOPs each" in deep.label
    whole_layer = deep.choices[0][0]
    assert whole_layer.startswith("whole layer · ") and whole_layer.endswith("F")
    assert [label for label, _ in deep.choices[1:3]] == ["block 0", "block 1"]


def test_toggle_prices_a_plan_exactly_like_the_cli(store, sdxl):
    out = blocks_tab.on_toggle(store, sdxl, "cpu", "bf16", SSD_1B[:10], SSD_1B[10:], [])
    assert out[0] == SSD_1B
    numbers = numbers_of(out)
    assert "2.57B" in numbers and "1.33B" in numbers  # README: 1,331,334,404
    assert "6.76 TFLOPs" in numbers and "4.21 TFLOPs" in numbers
    assert plan_view.LATENCY_MISSING in numbers


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_toy_shows_latency_deltas_before_anyone_profiles(tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))  # nothing timed on this machine
    view = plan_view.new_view("toy", 64)
    numbers = blocks_tab.on_toggle(Store(), view, "cpu", dtype, ["mid_block"])[1]
    assert f"latency, estimated (cpu, {dtype})" in numbers and "faster" in numbers
    assert "profile shipped with toy" in numbers and "press Profile to time it here" in numbers


def test_toggle_explains_the_mirrored_up_layer(store, sdxl):
    out = blocks_tab.on_toggle(store, sdxl, "cpu", "bf16", ["down_blocks.2.layers.1"])
    notes = out[2]
    assert "1 unit removed by you" in notes and "1 more removed automatically" in notes
    assert "up\\_blocks.0.layers" in notes
    arch = json.loads(out[3].plot)
    auto = next(t for t in arch["data"] if t["name"].startswith("removed automatically"))
    assert auto["x"], "the coupled up layer is drawn as removed automatically"


def test_impossible_plan_shows_why_and_keeps_the_last_numbers(store, sdxl):
    plan, numbers, notes, arch, bars = blocks_tab.on_toggle(
        store, sdxl, "cpu", "bf16", ["down_blocks.0.layers.0", "down_blocks.0.layers.1"]
    )
    assert plan == ["down_blocks.0.layers.0", "down_blocks.0.layers.1"]
    assert numbers == SKIP and arch == SKIP and bars == SKIP
    assert "wb-error" in notes and "at least one layer per stage" in notes


def test_figures_follow_plotly_schema_and_grey_out_removed_units(store, sdxl):
    import plotly.graph_objects as go

    out = blocks_tab.on_toggle(store, sdxl, "cpu", "bf16", ["mid_block"])
    arch, bars = json.loads(out[3].plot), json.loads(out[4].plot)
    go.Figure(arch)  # raises on any property plotly.js does not know
    go.Figure(bars)
    removed = next(t for t in arch["data"] if t["name"] == "removed")
    mid_row = arch["layout"]["yaxis"]["ticktext"].index("mid · 32×32")
    assert removed["y"] and set(removed["y"]) == {mid_row}
    assert len(removed["x"]) == 1 + 1 + 10 + 1  # 2 ResNets, attention shell, 10 blocks


def test_resolution_reprices_and_rejects_bad_sizes(store, tiny_unet_dir):
    view = plan_view.new_view(tiny_unet_dir, 64)
    new, numbers, *_ = blocks_tab.set_resolution(
        store, view, ["mid_block"], "128", "cpu", "bf16", max_px=4096
    )
    assert new["resolution"] == 128 and new["removed"] == ["mid_block"] and new["rev"] == view["rev"] + 1
    assert "FLOPs at 128 px" in numbers
    with pytest.raises(WorkbenchError, match="multiple of 32"):
        blocks_tab.set_resolution(store, view, [], "100", "cpu", "bf16", max_px=4096)
    with pytest.raises(WorkbenchError, match="not a number"):
        blocks_tab.set_resolution(store, view, [], "big", "cpu", "bf16", max_px=4096)
    with pytest.raises(WorkbenchError, match="limit of 2048"):
        blocks_tab.set_resolution(store, view, [], "4096", "cpu", "bf16", max_px=2048)


def test_profile_then_measure_on_a_real_tiny_pipeline(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "latency"))
    store, view = Store(), plan_view.new_view(tiny_pipeline_dir, 64)
    assert plan_view.LATENCY_MISSING in blocks_tab.on_toggle(store, view, "cpu", "fp32", SSD_1B)[1]
    numbers, *_ = blocks_tab.profile_latency(store, view, SSD_1B, "cpu", "fp32")
    assert "latency, estimated (cpu, fp32)" in numbers and "faster" in numbers
    assert "latency, estimated" in blocks_tab.on_toggle(Store(), view, "cpu", "fp32", [])[1]  # read from disk
    text = blocks_tab.measure_latency(store, view, SSD_1B, "cpu", "fp32", repeats=1)
    assert "**Measured** on cpu (fp32) at 64 px" in text and "estimated from the profile" in text
    with pytest.raises(WorkbenchError, match="fp16 is not supported on CPU"):
        blocks_tab.profile_latency(store, view, [], "cpu", "fp16")
    with pytest.raises(WorkbenchError, match="limit of 32 px"):
        blocks_tab.profile_latency(store, view, [], "cpu", "fp32", max_px=32)


def test_measured_md_reports_speedup_and_estimate_error():
    text = blocks_tab.measured_md(
        {
            "device": "cpu",
            "dtype": "bf16",
            "repeats": 5,
            "teacher_s": 2.0,
            "student_s": 1.0,
            "estimated_student_s": 1.1,
            "estimate_error": 0.1,
            "flops_ratio": 1.6,
        },
        n_removed=3,
        resolution=512,
    )
    assert "2.00x faster" in text and "estimate +10.0 % off" in text and "512 px" in text
    assert "1.60x fewer FLOPs" in text


# ------------------------------------------------------------------ model box


def test_missing_start_model_falls_back_to_sdxl_config_with_a_notice(store, tmp_path):
    name, notice = model_box.start_base(store, str(tmp_path / "no-such-model"))
    assert name == "sdxl-base"
    assert "no-such-model" in notice and "sampling and export need weights" in notice
    assert "Teacher: sdxl-base" in model_box.status_md(store, name, notice)


def test_loading_a_bad_model_says_what_is_accepted(store, sdxl, tmp_path):
    for text, match in (
        ("", "type a model"),
        (str(tmp_path / "nope"), "not a built-in name"),
        ("a b", "hub id"),
    ):
        with pytest.raises(WorkbenchError, match=match):
            model_box.load_model(store, Limits(), text, sdxl, [], "cpu", "bf16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="not a diffusers folder"):
        model_box.load_model(store, Limits(), str(tmp_path / "empty"), sdxl, [], "cpu", "bf16")


def test_a_failed_load_explains_itself_in_the_status_and_marks_no_output(store, sdxl, tmp_path):
    with pytest.warns(UserWarning, match="not a built-in name"):
        out = model_box.load_or_explain(store, Limits(), str(tmp_path / "nope"), sdxl, [], "cpu", "bf16", 4)
    assert len(out) == 8 and all(v == SKIP for i, v in enumerate(out) if i != 2)
    assert "Could not load that model" in out[2] and "not a built-in name" in out[2]
    assert "Teacher: sdxl-base" in out[2]  # the page still works on the teacher it had


def test_switching_model_keeps_a_plan_that_fits_and_drops_one_that_does_not(store, sdxl):
    view, plan, status, *_ = model_box.load_model(store, Limits(), "sd15-base", sdxl, SSD_1B, "cpu", "bf16")
    assert view["base"] == "sd15-base" and view["resolution"] == 512 and plan == []
    assert "does not fit this model" in status and "sampling and export need weights" in status
    view, plan, *_ = model_box.load_model(store, Limits(), "sdxl-base", view, ["mid_block"], "cpu", "bf16")
    assert plan == ["mid_block"] and view["base"] == "sdxl-base"  # SD 1.5 has a mid block too


def test_space_limits_refuse_large_weights(store):
    with pytest.raises(WorkbenchError, match="loads weights only up to"):
        model_box.check_weight_limit(store, "sdxl-base", Limits.for_space())


# ------------------------------------------------------------------ Presets tab


def test_apply_preset_replaces_the_toggles(store, sdxl):
    view, plan, status, numbers, *_ = presets_tab.apply_preset(store, sdxl, "ssd-1b", "cpu", "bf16")
    assert plan == SSD_1B and view["removed"] == SSD_1B and view["rev"] == sdxl["rev"] + 1
    assert "1.33B" in numbers and "ssd-1b" in status
    assert "2.57B → **745M** params" in presets_tab.preset_md(store, sdxl, "segmind-vega")  # 745,225,604


def test_preset_for_another_topology_is_refused_with_the_reason(store):
    sd15 = plan_view.new_view("sd15-base", 512)
    with pytest.raises(WorkbenchError, match="another UNet topology"):
        presets_tab.apply_preset(store, sd15, "ssd-1b", "cpu", "bf16")
    assert "Does not fit sd15-base" in presets_tab.preset_md(store, sd15, "ssd-1b")


def test_save_download_and_upload_round_trip(store, sdxl, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_PRESETS_DIR", str(tmp_path / "presets"))
    status, choices = presets_tab.save_plan(store, sdxl, ["mid_block"], "no-mid", "drops the mid block")
    assert "no-mid" in status and choices["value"] == "no-mid" and "no-mid" in choices["choices"]
    assert presets.load_preset("no-mid").removed == ("mid_block",)
    with pytest.raises(WorkbenchError, match="already exists"):
        presets_tab.save_plan(store, sdxl, ["mid_block"], "no-mid", "")
    with pytest.raises(WorkbenchError, match="not valid"):
        presets_tab.save_plan(store, sdxl, ["mid_block"], "bad name!", "")
    with pytest.raises(WorkbenchError, match="at least one layer"):
        presets_tab.save_plan(store, sdxl, ["down_blocks.0.layers.0", "down_blocks.0.layers.1"], "x", "")
    path = presets_tab.plan_file(store, sdxl, ["mid_block"], "", "")
    assert PruningPlan.load(path).removed == ("mid_block",)
    view, plan, status, *_ = presets_tab.upload_plan(store, sdxl, path, "cpu", "bf16")
    assert plan == ["mid_block"] and "1 units removed" in status


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"name": "x"}', "missing keys"),
        (b"\xff\xfe\x00", "not a UTF-8 text file"),
    ],
)
def test_malformed_uploads_get_precise_messages(store, sdxl, tmp_path, content, match):
    path = tmp_path / "upload.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(WorkbenchError, match=match):
        presets_tab.upload_plan(store, sdxl, str(path), "cpu", "bf16")


def test_upload_naming_unknown_units_suggests_the_right_id(store, sdxl, tmp_path):
    plan = PruningPlan.empty(store.catalog("sdxl-base"), name="typo").with_removed(["mid_blok"])
    path = tmp_path / "typo.json"
    path.write_text(plan.to_json())
    with pytest.raises(WorkbenchError, match="did you mean 'mid_block'"):
        presets_tab.upload_plan(store, sdxl, str(path), "cpu", "bf16")


# ------------------------------------------------------------------ Compare tab


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("prompt", "  ", "prompt is empty"),
        ("steps", 0, "between 1 and 100"),
        ("steps", 10_000, "between 1 and 100"),
        ("steps", 2.5, "whole number"),
        ("guidance", -1, "guidance must be between"),
        ("guidance", "lots", "must be a number"),
        ("seeds", "a", "not a whole number"),
        ("seeds", "", "at least one seed"),
        ("seeds", "0-99", "at most 8"),
        ("seeds", "5-2", "runs backwards"),
        ("size", 1000, "multiple of 32"),
        ("size", 8192, "limit of 2048"),
    ],
)
def test_compare_rejects_bad_fields_before_touching_a_model(store, field, value, match):
    fields = {
        "prompt": "a red circle",
        "negative": "",
        "seeds": "0",
        "steps": 4,
        "guidance": 5.0,
        "size": 1024,
    }
    fields[field] = value
    with pytest.raises(WorkbenchError, match=match):
        compare_tab.validate(store, "sdxl-base", Limits(), compare_tab.Form(**fields))


def test_seeds_accept_lists_and_ranges():
    assert compare_tab.parse_seeds("0, 1 7", 8) == [0, 1, 7]
    assert compare_tab.parse_seeds("2-4", 8) == [2, 3, 4]
    assert compare_tab.parse_seeds("3,3", 8) == [3]
    with pytest.raises(WorkbenchError, match="100001 seeds asked; this app draws at most 8"):
        compare_tab.parse_seeds("0-100000", 8)  # the whole range is counted, not the part listed


def test_compare_on_a_config_says_sampling_needs_weights(store, sdxl):
    assert "sampling needs weights" in compare_tab.availability_md(store, sdxl)
    with pytest.raises(WorkbenchError, match="sampling needs weights"):
        compare_tab.compare(
            store, Limits(), sdxl, [], compare_tab.Form("a red circle", "", "0", 2, 5.0, None)
        )


def test_compare_draws_teacher_and_student_with_the_same_seeds(tiny_pipeline_dir):
    store = Store()
    view = plan_view.new_view(tiny_pipeline_dir, 64)
    form = compare_tab.Form("a red circle", "", "3", 1, 2.0, 32)
    teacher, student, summary = compare_tab.compare(store, Limits(), view, SSD_1B, form)
    assert len(teacher) == len(student) == 1
    (t_img, t_caption), (s_img, s_caption) = teacher[0], student[0]
    assert t_img.size == s_img.size == (256, 256)  # 32 px drawn, shown enlarged 8x (sharp pixels)
    assert t_caption.startswith("seed 3 · ") and s_caption.startswith("seed 3 · ")
    assert "27 units removed" in summary and "1 steps" in summary and "32×32 px (shown 8× enlarged" in summary
    assert compare_tab.availability_md(store, view) == ""


def test_guidance_starts_at_the_loaded_models_own_and_follows_a_model_change(store):
    toy, sdxl = plan_view.new_view("toy", 64), plan_view.new_view("sdxl-base", 1024)
    assert compare_tab.guidance_for(store, toy, 5.0, None) == 2.0  # a page opens on the toy
    assert compare_tab.guidance_for(store, toy, 3.5, "toy") == 3.5  # the user's choice stays
    assert compare_tab.guidance_for(store, sdxl, 3.5, "toy") == 5.0  # another model: its own


def test_small_images_are_enlarged_by_a_whole_factor_with_sharp_pixels():
    from PIL import Image

    small = Image.new("RGB", (64, 32), "white")
    small.putpixel((0, 0), (255, 0, 0))
    big = fmt.enlarged(small, 256)
    assert big.size == (256, 128)
    assert {big.getpixel((x, y)) for x in range(4) for y in range(4)} == {(255, 0, 0)}  # one 4x4 block
    assert big.getpixel((4, 0)) == (255, 255, 255)
    large = Image.new("RGB", (1024, 1024))
    assert fmt.enlarged(large, 256) is large


# ------------------------------------------------------------------ Export tab


def test_export_needs_weights(store, sdxl):
    with pytest.raises(WorkbenchError, match="without weights"):
        export_tab.export_student(store, sdxl, [])


def test_export_zips_a_stock_diffusers_student(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    store = Store()
    view = plan_view.new_view(tiny_pipeline_dir, 64)
    archive, summary = export_tab.export_student(store, view, SSD_1B)
    with zipfile.ZipFile(archive) as z:
        names = {n.split("/", 1)[1] for n in z.namelist() if not n.endswith("/")}
        z.extractall(tmp_path)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "plan.json", "layer_map.json"} <= names
    folder = next(tmp_path.iterdir())
    unet = UNet2DConditionModel.from_pretrained(folder)
    spec = store.spec(tiny_pipeline_dir, SSD_1B)
    assert sum(p.numel() for p in unet.parameters()) == spec.student_params
    assert PruningPlan.load(folder / "plan.json").removed == tuple(SSD_1B)
    assert folder.name in summary and "from_pretrained" in summary


def test_export_refuses_an_impossible_plan_before_loading_weights(store, sdxl):
    with pytest.raises(WorkbenchError, match="at least one layer"):
        export_tab.export_student(store, sdxl, ["down_blocks.0.layers.0", "down_blocks.0.layers.1"])


# ------------------------------------------------------------------ app, settings and errors


def test_user_errors_become_a_toast_and_leave_the_outputs_unmarked():
    """Raising gr.Error would draw a red "Error" over every output of the event."""

    @user_errors
    def handler():
        raise WorkbenchError("seed 'x' is not a whole number")

    with pytest.warns(UserWarning, match="seed 'x'"):  # gr.Warning outside an event: the toast's text
        assert handler() == SKIP


def test_inline_errors_show_in_the_status_and_skip_the_rest():
    @inline_errors(n_outputs=3, status_at=1)
    def handler():
        raise WorkbenchError("preset name 'a b' is not valid")

    with pytest.warns(UserWarning, match="is not valid"):  # gr.Warning outside an event: the toast's text
        first, status, last = handler()
    assert first == SKIP and last == SKIP
    assert "wb-error" in status and "preset name &#x27;a b&#x27; is not valid" in status


def test_settings_follow_flags_and_environment():
    assert parse_args([], environ={}) == AppSettings()
    space = parse_args(["--port", "7000", "--host", "0.0.0.0"], environ={"WORKBENCH_SPACE": "1"})
    assert space.space and space.port == 7000 and space.host == "0.0.0.0"
    assert space.limits == Limits.for_space() and space.limits.max_steps < Limits().max_steps
    assert parse_args([], environ={"SYSTEM": "spaces"}).space  # on a Hugging Face Space by default
    assert not parse_args([], environ={"SYSTEM": "spaces", "WORKBENCH_SPACE": "0"}).space


def test_build_app_lays_out_the_tabs_without_loading_weights(store):
    from workbench.ui.app import build_app

    demo = build_app(AppSettings(base="sdxl-base"), store=store)
    labels = {b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)}
    assert {"Blocks", "Presets", "Compare", "Export"} <= labels
    assert not store.is_loaded("sdxl-base")


def test_latency_dtype_defaults_to_fp32_on_cpu():
    from workbench.ui.blocks_tab import default_dtype

    assert default_dtype("cpu") == "fp32"
    assert default_dtype("cuda") in ("bf16", "fp16")
