"""LoRA remapping: a teacher LoRA moved onto block-removed students through the layer map."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from workbench import lora, sgm
from workbench.cli import main
from workbench.cost import dummy_inputs
from workbench.errors import WorkbenchError
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
