"""LoRA remapping: a teacher LoRA moved onto block-removed students through the layer map."""

import json
import re
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from workbench import lora, sgm
from workbench.catalog import meta_unet
from workbench.cli import main
from workbench.cost import dummy_inputs
from workbench.errors import WorkbenchError
from workbench.modelcard import TOY_NAME
from workbench.models import TOY_DIR, resolve_base
from workbench.presets import load_preset
from workbench.surgery import build_student, student_spec
from workbench.testing import teacher_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A peft LoRA on the toy teacher's UNet and first text encoder, with non-zero B."""
    return teacher_lora(TOY_DIR, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def toy_pipe():
    return StableDiffusionXLPipeline.from_pretrained(TOY_DIR)


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """Module -> its LoRA delta (scale * B @ A, flattened to a matrix), as peft applies it."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            a = m.lora_A[adapter].weight.flatten(1)
            b = m.lora_B[adapter].weight.flatten(1)
            out[name] = m.scaling[adapter] * (b @ a)
    return out


@pytest.fixture(scope="module")
def teacher_deltas(toy_pipe, lora_file):
    unet = type(toy_pipe.unet).from_config(toy_pipe.unet.config)
    unet.load_state_dict(toy_pipe.unet.state_dict())
    pipe = StableDiffusionXLPipeline(**{**toy_pipe.components, "unet": unet})
    pipe.load_lora_weights(str(lora_file.parent), adapter_name="t")
    return _deltas(unet, "t")


def _student_pipe(toy_pipe, preset):
    student, spec = build_student(toy_pipe.unet, load_preset(preset))
    return StableDiffusionXLPipeline(**{**toy_pipe.components, "unet": student.eval()}), spec


def _misplaced(student_deltas, teacher_deltas, spec) -> int:
    """Student modules whose LoRA delta is not the one of the teacher module they inherited."""
    return sum(
        1
        for name, delta in student_deltas.items()
        if not torch.allclose(delta, teacher_deltas[spec.teacher_name(name)], atol=1e-6)
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ssd-1b", "koala-700m"])
def test_remapped_lora_lands_on_the_inherited_modules(
    preset, toy_pipe, lora_file, teacher_deltas, tmp_path, capsys
):
    out = tmp_path / "remapped"
    argv = ["lora", "--lora", str(lora_file), "--preset", preset, "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    pipe, spec = _student_pipe(toy_pipe, preset)
    adapter = "r_" + preset.replace("-", "_")  # the pipelines share the teacher's text encoders
    pipe.load_lora_weights(str(out), adapter_name=adapter)
    deltas = _deltas(pipe.unet, adapter)
    with safe_open(str(out / lora.WEIGHT_NAME), framework="pt") as f:
        saved = {k.removeprefix("unet.") for k in f.keys() if k.startswith("unet.")}
    loaded = set(get_peft_model_state_dict(pipe.unet, adapter_name=adapter))
    assert loaded == saved  # every saved pair found its module: no unexpected key
    units = report["unet_modules"]
    assert len(deltas) == units["kept"] + units["renamed"] and units["renamed"] > 0 and units["dropped"] > 0
    assert _misplaced(deltas, teacher_deltas, spec) == 0
    assert report["text_encoder_modules"] == 6 and _deltas(pipe.text_encoder, adapter)
    assert 0 < report["params_share_kept"] < 1 and 0 < report["delta_norm_share_kept"] < 1
    torch.manual_seed(0)
    inputs = dummy_inputs(spec.config, 8)
    with torch.no_grad():
        on = pipe.unet(**inputs).sample
        pipe.unet.disable_adapters()
        off = pipe.unet(**inputs).sample
    assert not torch.allclose(on, off, atol=1e-4)


@pytest.mark.slow
def test_loading_by_name_misplaces_what_the_report_predicts(toy_pipe, lora_file, teacher_deltas):
    """The report's 'loaded by name' figures are what load_lora_weights does without remapping."""
    base = resolve_base("toy")
    pairs, report = lora.remap(
        lora.read_lora(lora_file, base), student_spec(base.unet_config, load_preset("ssd-1b")).layer_map
    )
    pipe, spec = _student_pipe(toy_pipe, "ssd-1b")
    pipe.load_lora_weights(str(lora_file.parent), adapter_name="n")
    deltas = _deltas(pipe.unet, "n")
    assert report.misplaced_by_name == 32 == _misplaced(deltas, teacher_deltas, spec)
    assert len(deltas) == len(report.kept) + report.misplaced_by_name
    assert (
        len(report.kept) + len(report.renamed) + len(report.dropped) == len(deltas) + report.dropped_by_name
    )


def _kohya(lora_file, tmp_path) -> str:
    """The UNet part of the LoRA in kohya's naming with SGM block names (as sd-scripts writes SDXL LoRAs)."""
    base = resolve_base("toy")
    modules = sgm.unet_module_map(base.unet_config)
    out = {}
    for module, pair in lora.read_lora(lora_file, base).unet.items():
        name = "lora_unet_" + sgm.unet_key(module, modules).replace(".", "_")
        out[f"{name}.lora_down.weight"] = pair.a
        out[f"{name}.lora_up.weight"] = pair.b
        out[f"{name}.alpha"] = torch.tensor(pair.alpha)
    path = tmp_path / "kohya.safetensors"
    save_file(out, str(path))
    return str(path)


@pytest.mark.slow
def test_kohya_named_lora_remaps_like_the_diffusers_one(lora_file, tmp_path):
    base = resolve_base("toy")
    layer_map = student_spec(base.unet_config, load_preset("koala-700m")).layer_map
    mine, _ = lora.remap(lora.read_lora(lora_file, base), layer_map)
    kohya, report = lora.remap(lora.read_lora(_kohya(lora_file, tmp_path), base), layer_map)
    assert set(kohya) == set(mine) and report.text_encoder_modules == 0
    for module, pair in mine.items():
        other = kohya[module]
        assert torch.equal(pair.a, other.a) and torch.equal(pair.b, other.b) and pair.scale == other.scale


# ------------------------------------------------------------------ every LoRA form

WIDE = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "conv_shortcut", "conv", "time_emb_proj")  # fmt: skip


@pytest.fixture(scope="module")
def wide_raw(tmp_path_factory):
    """A peft LoRA (rank 4, alpha 8) on every kind of UNet target and the first text encoder:
    its raw tensors, keyed ``unet.<module>.lora_A.weight`` as save_lora_weights wrote them."""
    out = tmp_path_factory.mktemp("wide")
    text = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # as kohya's trainers target CLIP
    file = teacher_lora(TOY_DIR, out, unet_targets=WIDE, text_targets=text, seed=1)
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _pairs(raw, prefix: str = "unet.") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> (A, B) of the raw peft tensors of one model (``unet.`` or ``text_encoder.``)."""
    return {
        k.removeprefix(prefix).removesuffix(".lora_A.weight"): (v, raw[k.replace(".lora_A.", ".lora_B.")])
        for k, v in raw.items()
        if k.startswith(prefix) and k.endswith(".lora_A.weight")
    }


def _text_pairs(raw) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return _pairs(raw, "text_encoder.")


def _form_peft_without_metadata(raw, metadata, path):
    save_file(raw, str(path))
    return 1.0  # no alphas: diffusers applies B @ A (alpha = rank)


def _form_training_script(raw, metadata, path):
    """What diffusers' training scripts save: convert_state_dict_to_diffusers renames the attention
    projections' pairs to .lora.down/.lora.up and leaves proj_in, ff, convs as lora_A/lora_B."""
    converted = convert_state_dict_to_diffusers(raw)
    assert any(".to_k.lora.down." in k for k in converted) and any(
        ".ff.net.2.lora_A." in k for k in converted
    )
    save_file(converted, str(path), metadata=metadata)
    return 2.0  # the metadata's alpha 8 over rank 4


def _kohya_file(raw, path, sgm_names: bool, alphas: bool) -> None:
    modules = sgm.unet_module_map(resolve_base("toy").unet_config)
    out = {}
    groups = [("lora_unet_", _pairs(raw), True), ("lora_te1_", _text_pairs(raw), False)]
    for prefix, pairs, unet in groups:
        for module, (a, b) in pairs.items():
            if unet:
                path_ = sgm.unet_key(module, modules) if sgm_names else module
            else:  # kohya names CLIP modules under text_model, a level transformers 5 dropped
                path_ = "text_model." + module
            name = prefix + path_.replace(".", "_")
            out |= {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b}
            if alphas:
                out[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(out, str(path))


def _form_kohya_sgm_alphas(raw, metadata, path):
    _kohya_file(raw, path, sgm_names=True, alphas=True)
    return 2.0


def _form_kohya_diffusers_names(raw, metadata, path):
    _kohya_file(raw, path, sgm_names=False, alphas=False)
    return 1.0


FORMS = {
    "peft-no-metadata": _form_peft_without_metadata,
    "training-script": _form_training_script,  # refused before: attention pairs were left unread
    "kohya-sgm-alphas": _form_kohya_sgm_alphas,
    "kohya-diffusers-names": _form_kohya_diffusers_names,
}


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
def test_every_lora_form_lands_on_the_inherited_modules(form, wide_raw, toy_pipe, tmp_path, capsys):
    raw, metadata = wide_raw
    scale = FORMS[form](raw, metadata, tmp_path / "teacher.safetensors")
    truth = {m: scale * b.flatten(1) @ a.flatten(1) for m, (a, b) in _pairs(raw).items()}
    out = tmp_path / "student"
    argv = ["lora", "--lora", str(tmp_path / "teacher.safetensors"), "--preset", "ssd-1b", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["naming"].startswith("kohya" if form.startswith("kohya") else "diffusers")
    pipe, spec = _student_pipe(toy_pipe, "ssd-1b")
    adapter = "f_" + form.replace("-", "_")
    pipe.load_lora_weights(str(out), adapter_name=adapter)
    deltas = _deltas(pipe.unet, adapter)
    units = report["unet_modules"]
    assert units["kept"] + units["renamed"] + units["dropped"] == len(truth)  # every pair was read
    assert len(deltas) == units["kept"] + units["renamed"] and units["renamed"] > 0 and units["dropped"] > 0
    assert _misplaced(deltas, truth, spec) == 0
    assert {n.rsplit(".", 1)[-1] for n in deltas} >= {
        "to_k",
        "proj_out",
        "2",
        "conv2",
        "conv_shortcut",
        "conv",
    }
    assert report["text_encoder_modules"] == len(_text_pairs(raw)) and _deltas(pipe.text_encoder, adapter)


def _kohya_key(module: str, config) -> str:
    return "lora_unet_" + sgm.unet_key(module, sgm.unet_module_map(config)).replace(".", "_")


@pytest.mark.slow
def test_kohya_in_kohya_out_keeps_its_key_style_and_values(wide_raw, tmp_path, capsys):
    raw, metadata = wide_raw
    _form_kohya_sgm_alphas(raw, metadata, tmp_path / "in.safetensors")
    out = tmp_path / "out"
    argv = ["lora", "--lora", str(tmp_path / "in.safetensors"), "--preset", "koala-700m", "--out", str(out)]
    assert main(argv) == 0 and "naming: kohya" in capsys.readouterr().out
    base = resolve_base("toy")
    spec = student_spec(base.unet_config, load_preset("koala-700m"))
    with safe_open(str(tmp_path / "in.safetensors"), framework="pt") as f:
        given = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(out / lora.WEIGHT_NAME), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    expected = {}  # student key -> the teacher key whose tensor it must carry
    for module in _pairs(raw):
        student = lora.student_module(module, lora.inverse_layer_map(spec.layer_map))
        if student is not None:
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                expected[_kohya_key(student, spec.config) + suffix] = (
                    _kohya_key(module, base.unet_config) + suffix
                )
    expected |= {k: k for k in given if k.startswith("lora_te1_")}
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], given[v]) for k, v in expected.items())
    assert any(k != v for k, v in expected.items())  # some pairs moved to another SGM index
    # ComfyUI names a LoRA pair by its module's key in the checkpoint (lora_unet_ + the original
    # key without .weight, dots as underscores): every UNet pair names a module of the exported student
    original = sgm.unet_to_original(meta_unet(spec.config).state_dict(), spec.config)
    modules = {"lora_unet_" + k.removeprefix(sgm.UNET_PREFIX).removesuffix(".weight").replace(".", "_")
               for k in original if k.endswith(".weight")}  # fmt: skip
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in written}
    assert {n for n in names if n.startswith("lora_unet_")} <= modules
    clip = re.compile(
        r"^lora_te1_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$"
    )
    assert all(clip.match(n) for n in names if not n.startswith("lora_unet_"))


# ------------------------------------------------------------------ the teacher of a student folder


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ssd1b"
    assert main(["export", "--preset", "ssd-1b", "--format", "diffusers", "--out", str(out)]) == 0
    return out


def test_lora_for_an_export_takes_the_teacher_its_card_records(toy_export, lora_file, tmp_path, capsys):
    argv = ["lora", "--lora", str(lora_file), "--student", str(toy_export), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["teacher"] == "toy" and "model card" in found["teacher_from"]
    assert found["unet_modules"]["renamed"] > 0 and (tmp_path / "o" / lora.WEIGHT_NAME).is_file()


def test_a_single_files_metadata_names_the_teacher_without_a_card(toy_export, lora_file, tmp_path, capsys):
    folder = tmp_path / "student"
    shutil.copytree(toy_export, folder, ignore=shutil.ignore_patterns("*.safetensors", "README.md"))
    save_file(
        {"x": torch.zeros(1)}, str(folder / "student.safetensors"), metadata={"workbench.teacher": TOY_NAME}
    )
    argv = ["lora", "--lora", str(lora_file), "--student", str(folder), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(argv) == 0
    assert (
        "teacher: toy (from the workbench.teacher metadata of student.safetensors)" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "card, message",
    [
        (None, "records no teacher"),
        (
            "# Student of my-sdxl-finetune (plan `ssd-1b`)\n",
            "only as the local folder name 'my-sdxl-finetune'",
        ),
    ],
)
def test_an_export_without_a_usable_teacher_asks_for_base(
    card, message, toy_export, lora_file, tmp_path, capsys
):
    folder = tmp_path / "student"
    shutil.copytree(toy_export, folder, ignore=shutil.ignore_patterns("*.safetensors", "README.md"))
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    argv = ["lora", "--lora", str(lora_file), "--student", str(folder), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "--base" in err and "\n" not in err


def test_delta_norm_without_the_product():
    torch.manual_seed(0)
    a, b = torch.randn(4, 9, 3, 3), torch.randn(16, 4, 1, 1)
    pair = lora.Pair(a=a, b=b, r=4, alpha=2.0, scale=0.5)
    assert pair.delta_norm() == pytest.approx(
        float((0.5 * b.double().flatten(1) @ a.double().flatten(1)).norm()), rel=1e-9
    )


# ------------------------------------------------------------------ bad input


def _pickled(tmp_path):
    path = tmp_path / "lora.bin"
    torch.save({"x": torch.zeros(1)}, path)
    return str(path)


def _other_base_lora(tmp_path, perturbed_pipeline):
    return str(teacher_lora(perturbed_pipeline, tmp_path / "other", text_encoder=False))


def _garbage(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    return str(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t, p: ["--lora", _pickled(t), "--preset", "ssd-1b"], "is not a .safetensors file"),
        (lambda t, p: ["--lora", _garbage(t), "--preset", "ssd-1b"], "is not a valid safetensors file"),
        (lambda t, p: ["--lora", _other_base_lora(t, p), "--preset", "ssd-1b"], "was not trained on 'toy'"),
        (lambda t, p: ["--lora", str(t / "none.safetensors"), "--preset", "ssd-1b"], "does not exist"),
    ],
)  # fmt: skip
def test_bad_lora_input_is_one_line(make, message, tmp_path, capsys, perturbed_pipeline):
    argv = ["lora", *make(tmp_path, perturbed_pipeline), "--out", str(tmp_path / "o")]
    capsys.readouterr()  # what making the inputs printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_student_folder_without_layer_map_is_refused(tmp_path, lora_file, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text("{}")
    argv = ["lora", "--lora", str(lora_file), "--student", str(tmp_path / "s"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "has no layer_map.json" in capsys.readouterr().err
    with pytest.raises(WorkbenchError, match="holds no student"):
        lora_folder_without_config(tmp_path)


def lora_folder_without_config(tmp_path):
    from workbench.export import read_student_folder

    (tmp_path / "empty").mkdir()
    return read_student_folder(tmp_path / "empty")
