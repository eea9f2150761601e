"""The embedded toy teacher: loads with stock diffusers, follows prompts, and the
toy checker / similarity metrics judge what they should. Uses the real model
(offline: conftest sets HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from workbench import quality
from workbench.cli import main
from workbench.models import TOY_DIR
from workbench.sampling import generate
from workbench.toy import checker, world


@pytest.fixture(scope="module")
def toy_pipe() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(TOY_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_with_stock_diffusers_and_has_sdxl_topology(toy_pipe):
    cfg = toy_pipe.unet.config
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(cfg.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert list(cfg.transformer_layers_per_block) == [1, 2, 10]
    assert cfg.layers_per_block == 2
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert cfg.addition_embed_type == "text_time"
    hidden = toy_pipe.text_encoder.config.hidden_size + toy_pipe.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == hidden
    # The pipeline's default size is the size the model was trained at.
    assert cfg.sample_size * toy_pipe.vae_scale_factor == world.RESOLUTION


def test_tokenizer_keeps_every_caption_word_whole():
    assert (TOY_DIR / "tokenizer" / "vocab.json").is_file()
    assert (TOY_DIR / "tokenizer" / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(TOY_DIR / "tokenizer")
    for word in world.vocabulary():
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    longest = max(len(tok(s.caption).input_ids) for s in world.all_scenes())
    assert longest <= tok.model_max_length


def test_world_is_deterministic_and_split_is_disjoint():
    scene = world.all_scenes()[7]
    assert world.render(scene, seed=3).tobytes() == world.render(scene, seed=3).tobytes()
    train = {s.caption for s in world.train_scenes()}
    held = {s.caption for s in world.held_out_scenes()}
    assert held and not train & held
    assert len(world.evaluation_set(20, 3)) >= 50
    assert all(scene.caption in held for scene, _ in world.evaluation_set(20, 3))


def test_checker_accepts_ground_truth_and_rejects_wrong_captions():
    rng = random.Random(0)
    scenes = rng.sample(world.all_scenes(), 120)
    images = [world.render(s, seed=i) for i, s in enumerate(scenes)]
    assert checker.fidelity(images, [s.caption for s in scenes]) >= 0.97
    wrong = [_wrong_caption(s, rng) for s in scenes]
    assert checker.fidelity(images, wrong) <= 0.03


def _wrong_caption(scene: world.Scene, rng: random.Random) -> str:
    """Same scene with another colour or another shape (or both)."""
    colour, shape = scene.colour, scene.shape
    change = rng.choice(("colour", "shape", "both"))
    if change in ("colour", "both"):
        colour = rng.choice([c for c in world.COLOURS if c != colour])
    if change in ("shape", "both"):
        shape = rng.choice([s for s in world.SHAPES if s != shape])
    return world.Scene(shape, colour, scene.background, scene.position, scene.size).caption


def test_teacher_follows_held_out_prompts(toy_pipe):
    pairs = world.evaluation_set(n_prompts=12, seeds_per_prompt=1)
    prompts = [s.caption for s, _ in pairs]
    images = generate(toy_pipe, prompts, [seed for _, seed in pairs], steps=20, guidance=5.0)
    # Tolerant: the full evaluation (60 samples) is what the README reports.
    assert checker.fidelity(images, prompts) >= 0.6


def test_same_seed_gives_same_image_and_unet_swap_is_restored(toy_pipe):
    prompts, seeds = ["a large red circle on a white background, center"] * 2, [5, 5]
    a = generate(toy_pipe, prompts, seeds, steps=4, guidance=5.0)
    original = toy_pipe.unet
    b = generate(toy_pipe, prompts[:1], seeds[:1], steps=4, guidance=5.0, unet=toy_pipe.unet)
    assert toy_pipe.unet is original
    assert a[0].tobytes() == a[1].tobytes()
    # Another batch size may change BLAS rounding, never the image.
    assert quality.compare(b, a[:1])["psnr"] > 40


def test_psnr_and_ssim():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert quality.psnr(x, x).tolist() == [100.0, 100.0]
    assert torch.allclose(quality.ssim(x, x), torch.ones(2, dtype=torch.float64))
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert 15 < float(quality.psnr(x, noisy).mean()) < 25
    assert float(quality.ssim(x, noisy).mean()) < 0.95
    # A known value: a constant offset of 0.1 is exactly 20 dB.
    assert quality.psnr(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.1)).item() == pytest.approx(20.0)


def test_cli_sample_writes_png(tmp_path):
    out = tmp_path / "img.png"
    prompt = "a small blue square on a black background, top left"
    assert main(["sample", "--prompt", prompt, "--seed", "1", "--steps", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    "extra",
    [["--prompt", " "], ["--prompt", "a red circle", "--steps", "0"]],
)
def test_cli_sample_rejects_bad_options(tmp_path, capsys, extra):
    assert main(["sample", *extra, "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_evaluate_json_with_teacher_as_student(tmp_path, capsys):
    args = ["evaluate", "--prompts", "2", "--seeds", "1", "--steps", "4", "--json"]
    assert main([*args, "--unet", str(TOY_DIR / "unet")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"fidelity", "student_fidelity", "psnr", "ssim"} <= result.keys()
    assert result["psnr"] == 100.0 and result["ssim"] == pytest.approx(1.0)
    assert main([*args, "--unet", str(tmp_path / "missing")]) == 2
