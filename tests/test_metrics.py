"""The field's metrics on tiny real models built from configs (nothing downloads): FID/KID
through torchmetrics with a tiny feature extractor, CLIP score and PickScore with a tiny
CLIPModel saved to a folder, prompt files, and `evaluate --metrics` end to end (the
teacher's images cached between runs, results kept beside the run's student)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from workbench import evaluation as ev
from workbench import sampling
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.evaluation import clip as cliplib
from workbench.evaluation import distribution, perceptual, prompts, suite
from workbench.stats import Bootstrap
from workbench.toy import tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFeatures(torch.nn.Module):
    """A tiny Inception stand-in: conv -> ReLU -> global pool -> 12-d, seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float() / 255.0)).mean(dim=(2, 3))


def _images(n: int, seed: int, shift: float = 0.0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.random((n, 24, 24, 3)) * 0.6 + shift
    return [Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)) for a in base]


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    extractor = TinyFeatures()
    real = distribution.extract(_images(40, 0), extractor)
    same = distribution.fid(real, real)
    other_draw = distribution.fid(real, distribution.extract(_images(40, 1), extractor))
    shifted = distribution.fid(real, distribution.extract(_images(40, 1, shift=0.3), extractor))
    assert abs(same) < 1e-6 and shifted > 10 * other_draw > 0
    # the same number torchmetrics gives with the extractor passed to it directly
    direct = FrechetInceptionDistance(feature=extractor)
    direct.update(distribution.as_uint8(_images(40, 0)), real=True)
    direct.update(distribution.as_uint8(_images(40, 1, shift=0.3)), real=False)
    assert float(direct.compute()) == pytest.approx(shifted, rel=1e-6)
    kid_same, kid_shift = (
        distribution.kid(real, f)[0] for f in (real, distribution.extract(_images(40, 1, 0.3), extractor))
    )
    assert kid_shift > 10 * abs(kid_same)


def test_fid_interval_reweights_the_fake_set_exactly():
    extractor = TinyFeatures()
    real = distribution.extract(_images(30, 0), extractor)
    fake = distribution.extract(_images(30, 1, shift=0.1), extractor)
    ones = np.ones((1, 30))
    assert distribution.fid_replicates(real, fake, ones)[0] == pytest.approx(
        distribution.fid(real, fake), rel=1e-6
    )
    doubled = np.concatenate([np.full(15, 2.0), np.zeros(15)])[None]  # first half drawn twice
    assert distribution.fid_replicates(real, fake, doubled)[0] == pytest.approx(
        distribution.fid(real, torch.cat([fake[:15], fake[:15]])), rel=1e-6
    )
    est = distribution.fid_estimate(real, fake, Bootstrap(list(range(30))))
    assert est.low <= est.mean <= est.high and est.high > est.low


def test_paired_fid_interval_reweights_both_sets_alike():
    """Teacher and student images of the same samples: a resample takes the same rows of
    both (exactly torchmetrics' FID of the resampled sets), so a student close to its teacher
    image by image keeps an interval around its point, where re-weighting one side alone
    breaks the pairing and lifts every resample far above it."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(60, 12, generator=gen, dtype=torch.float64)
    fake = real + 0.05 * torch.randn(60, 12, generator=gen, dtype=torch.float64)
    drawn = np.bincount(np.random.default_rng(1).integers(0, 60, 60), minlength=60)[None].astype(float)
    rows = torch.from_numpy(np.repeat(np.arange(60), drawn[0].astype(int)))
    assert distribution.paired_fid_replicates(real, fake, drawn)[0] == pytest.approx(
        distribution.fid(real[rows], fake[rows]), rel=1e-6
    )
    bootstrap = Bootstrap([f"p{i // 2}" for i in range(60)])  # two seeds per prompt
    paired = distribution.fid_estimate(real, fake, bootstrap, paired=True)
    one_side = distribution.fid_estimate(real, fake, bootstrap)
    assert paired.low <= paired.mean <= paired.high < 3 * paired.mean
    assert one_side.high > 10 * paired.high


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny CLIPModel (seeded, untrained) with the toy tokenizer, saved with its processor."""
    folder = tmp_path_factory.mktemp("clip")
    tok = tokenizer.save(folder / "tok")
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": tokenizer.MAX_LENGTH,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder / "m"
    )
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder / "m")
    return str(folder / "m")


def test_clip_score_is_torchmetrics_and_pickscore_its_scaled_cosine(tiny_clip):
    clip = cliplib.load(tiny_clip)
    images = _images(6, 3) + _images(6, 4, shift=0.3)
    words = [
        "a red circle",
        "a big blue square",
        "green",
        "a small yellow triangle on white",
        "red",
        "blue",
    ] * 2
    ours = cliplib.clip_score(clip, images, words)
    assert ours.shape == (12,) and len(set(np.round(ours, 6))) > 6
    metric = CLIPScore(model_name_or_path=lambda: (clip.model, clip.processor))
    metric.update(cliplib.as_tensors(images), words)
    assert float(metric.compute()) == pytest.approx(max(ours.mean(), 0.0), abs=1e-4)
    # independent of torchmetrics: transformers' own forward gives logit_scale * cosine
    raw = CLIPModel.from_pretrained(tiny_clip).eval()
    inputs = clip.processor(text=words, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = raw(**inputs).logits_per_image.diagonal().double().numpy()
    assert ours == pytest.approx(100 * logits / raw.logit_scale.exp().item(), abs=1e-3)
    assert cliplib.pickscore(clip, images, words) == pytest.approx(logits, abs=1e-4)
    with pytest.raises(WorkbenchError, match="cannot load the CLIP model"):
        cliplib.load(str(Path(tiny_clip).parent / "missing"))


def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\na cat\n  a bird  \n")
    assert prompts.read(txt) == ["a cat", "a dog", "a bird"]
    jsonl = tmp_path / "coco.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image_id": i, "caption": f"caption {i}"}) for i in range(10)))
    assert prompts.pick(prompts.read(jsonl), 3) == ["caption 0", "caption 3", "caption 6"]
    with pytest.raises(WorkbenchError, match="between 1 and 10"):
        prompts.pick(prompts.read(jsonl), 11)
    jsonl.write_text('{"url": "x"}\n')
    with pytest.raises(WorkbenchError, match="line 1 needs a string"):
        prompts.read(jsonl)
    with pytest.raises(WorkbenchError, match=".txt"):
        prompts.read(tmp_path / "p.csv")


def test_metric_choices_are_checked_before_anything_loads():
    with pytest.raises(WorkbenchError, match="unknown bleu"):
        suite.parse("fid,bleu")
    with pytest.raises(WorkbenchError, match="need --clip-model"):
        suite.Metrics(("clip",))
    with pytest.raises(WorkbenchError, match="add fid or kid"):
        suite.Metrics(("clip",), clip_model="x", reference="/tmp")


@pytest.mark.skipif(not perceptual.available(), reason="LPIPS needs torchvision (not installed here)")
def test_lpips_of_an_image_with_itself_is_zero():
    a = _images(2, 0)
    assert perceptual.lpips(a, a) == pytest.approx([0, 0], abs=1e-6)


@pytest.fixture()
def run_with_student(perturbed_pipeline, tmp_path) -> Path:
    """A run folder whose student is the teacher's UNet (what matters here is where results go)."""
    run = tmp_path / "runs" / "r1"
    shutil.copytree(Path(perturbed_pipeline) / "unet", run / "student")
    (run / "job.json").write_text(json.dumps({"base": {"name": "pipe", "location": perturbed_pipeline}}))
    (run / "status.json").write_text(json.dumps({"state": "done", "step": 3}))
    return run


def test_evaluate_twice_reuses_the_teachers_images(perturbed_pipeline, run_with_student, tiny_clip, monkeypatch,
                                                   capsys):  # fmt: skip
    drawn: list[str] = []
    real_generate = sampling.generate

    def counting(pipe, prompts_, seeds, **kw):  # the real sampler, counted
        drawn.append("teacher" if kw.get("unet") is None else "student")
        return real_generate(pipe, prompts_, seeds, **kw)

    monkeypatch.setattr(sampling, "generate", counting)
    args = ["evaluate", "--base", perturbed_pipeline, "--unet", str(run_with_student / "student"), "--prompts", "3",
            "--seeds", "2", "--steps", "2", "--metrics", "fid,kid,clip,pickscore", "--clip-model", tiny_clip,
            "--pickscore-model", tiny_clip, "--pickscore-processor", tiny_clip, "--fid-features", "clip", "--json"]  # fmt: skip
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert drawn == ["teacher", "student"]
    drawn.clear()
    assert main(args) == 0
    out = capsys.readouterr()
    second = json.loads(out.out)
    assert drawn == ["student"]  # the teacher's images came from the cache
    assert "teacher: 6 images from the cache" in out.err and "student: drew 6 images" in out.err
    assert second["teacher"] == first["teacher"] and second["student"] == first["student"]
    assert list(second["student"]) == ["clip", "pickscore", "fid", "kid", "psnr", "ssim"]
    assert second["student"]["psnr"]["mean"] == 100.0 and abs(second["student"]["fid"]["mean"]) < 1e-3
    assert (
        set(second["protocol"]) == {"fid", "kid", "clip", "pickscore"}
        and "FD_CLIP" in second["protocol"]["fid"]
    )
    record = ev.read_record(run_with_student / "evaluation" / "evaluation.json")
    assert record["unet"] == "student" and str(run_with_student) not in json.dumps(record)  # no local paths
    assert sorted(p.name for p in (run_with_student / "evaluation" / "student").iterdir()) == [
        f"{i:04d}.png" for i in range(6)
    ]


def test_a_reference_folder_scores_the_teacher_too(perturbed_pipeline, tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(_images(5, 9)):
        img.resize((32, 32)).save(ref / f"{i}.png")
    args = ["evaluate", "--base", perturbed_pipeline, "--prompts", "2", "--seeds", "2", "--steps", "2",
            "--metrics", "fid", "--fid-features", "pixels", "--reference", str(ref), "--reference-count", "4",
            "--eval-size", "16",
            "--json", "--quiet"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["teacher"]["fid"]["reference_n"] == 4 and result["teacher"]["fid"]["mean"] > 0
    assert "reference folder 'ref' (4 images" in result["protocol"]["fid"]
    assert "resized to 16x16 (bicubic)" in result["protocol"]["fid"]
    assert [i.size for i in distribution.square([Image.new("RGB", (40, 20))], 16)] == [(16, 16)]
    assert main([*args[:-2], "--reference-count", "99"]) == 2
    assert "between 2 and 5" in capsys.readouterr().err
