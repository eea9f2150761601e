"""The embedded toy teacher: loads with stock diffusers, follows prompts, and the
toy checker / similarity metrics judge what they should. Uses the real model
(offline: conftest sets HF_HUB_OFFLINE)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from workbench import evaluation, quality
from workbench.cli import main
from workbench.models import TOY_DIR
from workbench.sampling import generate
from workbench.stats import Bootstrap, Estimate
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


def test_evaluation_samples_are_the_held_out_captions_each_with_its_own_seed():
    held = {s.caption for s in world.held_out_scenes()}
    everything = evaluation.default_samples(True, None, None)
    assert len(everything) == len(held) * evaluation.TOY_SEEDS
    assert {s.prompt for s in everything} == held
    assert len({s.seed for s in everything}) == len(everything)  # no two samples share noise
    assert len({s.group for s in everything}) == len(held)
    # a smaller evaluation draws a subset of the very same samples
    subset = evaluation.default_samples(True, 12, 2)
    assert len({s.prompt for s in subset}) == 12 and len(subset) == 24
    assert {(s.prompt, s.seed) for s in subset} <= {(s.prompt, s.seed) for s in everything}
    assert evaluation.default_samples(True, 12, 2) == subset


# Every value of every attribute, as the world draws it.
_VALUES = {
    "colour": list(world.COLOURS),
    "shape": list(world.SHAPES),
    "background": list(world.BACKGROUNDS),
    "position": list(world.POSITIONS),
    "size": list(world.SIZES),
}


@pytest.fixture(scope="module")
def rendered() -> list[tuple[world.Scene, dict]]:
    """Every scene of the world at two seeds (rendered images are the ground truth), with
    what the checker reads from each."""
    return [
        (scene, checker.describe(world.render(scene, seed=seed)))
        for scene in world.all_scenes()
        for seed in (0, 1)
    ]


def test_checker_names_every_attribute_of_every_rendered_scene(rendered):
    assert list(_VALUES) == list(checker.ATTRIBUTES)
    for attribute, values in _VALUES.items():  # every value is drawn...
        assert {getattr(scene, attribute) for scene, _ in rendered} == set(values)
    for scene, seen in rendered:  # ...and read right, every time
        assert seen == {a: getattr(scene, a) for a in checker.ATTRIBUTES}, scene.caption


def test_a_caption_wrong_in_one_attribute_is_judged_wrong_in_that_attribute_only(rendered):
    for scene, seen in rendered:
        for attribute, values in _VALUES.items():
            for other in values:
                if other == getattr(scene, attribute):
                    continue
                wrong = dataclasses.replace(scene, **{attribute: other}).caption
                judgement = checker.Judgement(checker.parse_prompt(wrong), seen)
                assert [a for a in checker.ATTRIBUTES if not judgement.right(a)] == [attribute], wrong
                assert not judgement.full_ok
                assert judgement.ok == (attribute not in ("colour", "shape"))


def test_judge_reads_the_image_and_the_prompt():
    scene = world.Scene("triangle", "yellow", "black", "bottom right", "large")
    judgement = checker.judge(world.render(scene, seed=3), scene.caption)
    assert judgement.full_ok and judgement.ok and judgement.wanted == judgement.seen
    wrong = checker.judge(world.render(scene, seed=3), scene.caption.replace("bottom right", "top left"))
    assert wrong.ok and not wrong.full_ok and not wrong.right("position")


def test_teacher_follows_held_out_prompts(toy_pipe):
    samples = evaluation.samples(evaluation.toy_prompts(12), 1)
    prompts = [s.prompt for s in samples]
    images = generate(toy_pipe, prompts, [s.seed for s in samples], steps=20, guidance=5.0)
    values, _ = evaluation.judge(images, samples)
    # Tolerant: the recorded evaluation (all held-out captions, several seeds each) is the figure.
    assert values["fidelity"].mean() >= 0.6


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


def test_cli_evaluate_with_teacher_as_student(tmp_path, capsys):
    args = ["evaluate", "--prompts", "2", "--seeds", "2", "--steps", "4"]
    save = tmp_path / "eval.json"
    assert main([*args, "--json", "--unet", str(TOY_DIR / "unet"), "--save", str(save)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "per_sample" not in result  # printed: the summary; saved: everything
    # the toy samples with its own guidance (2) unless told otherwise
    assert result["settings"] == {"steps": 4, "guidance": 2.0, "prompts": 2, "seeds": 2, "samples": 4}
    assert list(result["teacher"]) == list(evaluation.ACCURACIES)
    assert list(result["student"]) == [*evaluation.ACCURACIES, *evaluation.SIMILARITIES]
    for key in evaluation.ACCURACIES:  # the teacher as its own student: same images, same verdicts
        assert result["student"][key] == result["teacher"][key]
        low, high = result["teacher"][key]["low"], result["teacher"][key]["high"]
        assert 0 <= low <= result["teacher"][key]["mean"] <= high <= 1
    assert result["student"]["psnr"]["mean"] == 100.0
    assert result["student"]["ssim"]["mean"] == pytest.approx(1.0)
    record = evaluation.read_record(save)
    assert {k: v for k, v in record.items() if k not in ("per_sample", "software")} == {
        k: v for k, v in result.items() if k != "software"
    }
    assert record["weights"]["teacher"] == record["weights"]["student"]  # the same UNet file
    rows = record["per_sample"]
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        (s.prompt, s.seed) for s in evaluation.default_samples(True, 2, 2)
    ]
    assert rows[0]["student"]["psnr"] == 100.0 and set(rows[0]["teacher"]["seen"]) == set(checker.ATTRIBUTES)

    assert main([*args, "--unet", str(TOY_DIR / "unet")]) == 0
    text = capsys.readouterr().out
    assert "4 samples (2 prompts x 2 seeds)" in text and "full prompt" in text and "PSNR dB" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--unet", "/nonexistent"], "not a UNet folder"),
        (["--prompts", "82"], "between 1 and 81"),
        (["--seeds", "0"], "positive integer"),
        (["--save", "x.txt"], ".json"),
        (["--base", "sdxl-base"], "no prompt checker"),
    ],
)
def test_cli_evaluate_rejects_bad_options(capsys, extra, message):
    assert main(["evaluate", "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


# --------------------------------------------------------------------------- the recorded evaluation

RECORD = TOY_DIR / "evaluation.json"
_NO_RECORD = pytest.mark.skipif(
    not RECORD.exists(),
    reason="the toy teacher has no recorded evaluation yet (workbench/assets/toy-sdxl/evaluation.json)",
)


@_NO_RECORD
def test_recorded_evaluation_is_of_the_shipped_weights_and_adds_up():
    data = evaluation.read_record(RECORD)
    assert data["base"] == "toy" and data["unet"] is None and data["student"] is None
    assert data["weights"]["teacher"] == evaluation.weights_digest(TOY_DIR / "unet"), (
        "evaluation.json was recorded for other UNet weights: evaluate the shipped teacher again"
    )
    settings, interval = data["settings"], data["interval"]
    samples = evaluation.record_samples(data)
    assert samples == evaluation.default_samples(True, settings["prompts"], settings["seeds"])
    teacher = evaluation.record_scores(data)
    for i, (sample, seen) in enumerate(zip(samples, teacher.seen)):  # verdicts follow from what was seen
        judgement = checker.Judgement(checker.parse_prompt(sample.prompt), seen)
        assert [teacher.values[a][i] for a in checker.ATTRIBUTES] == [
            judgement.right(a) for a in checker.ATTRIBUTES
        ]
        assert (teacher.values["full"][i], teacher.values["fidelity"][i]) == (judgement.full_ok, judgement.ok)
    boot = Bootstrap(
        [s.group for s in samples], resamples=interval["resamples"], seed=interval["seed"],
        level=interval["level"],
    )  # fmt: skip
    assert interval == boot.describe()
    for key, est in data["teacher"].items():
        assert boot.mean(teacher.values[key]).to_dict() == pytest.approx(est, abs=1e-12), key


@_NO_RECORD
def test_the_model_card_quotes_the_recorded_figures():
    """README.md beside the weights shows each figure as `evaluate` prints it: 0.912 [0.887, 0.934]."""
    card = (TOY_DIR / "README.md").read_text(encoding="utf-8")
    data = evaluation.read_record(RECORD)
    missing = [k for k, est in data["teacher"].items() if Estimate.from_dict(est).format() not in card]
    assert not missing, f"workbench/assets/toy-sdxl/README.md lacks the recorded {missing}"


@_NO_RECORD
def test_recorded_figures_match_a_quick_reevaluation(toy_pipe):
    """16 of the recorded samples drawn again: the checker must see what it saw then."""
    data = evaluation.read_record(RECORD)
    firsts = [s for s in evaluation.record_samples(data) if s.seed == evaluation.sample_seed(s.prompt, 0)]
    subset = [firsts[i * len(firsts) // 16] for i in range(min(16, len(firsts)))]
    settings = data["settings"]
    images = generate(
        toy_pipe, [s.prompt for s in subset], [s.seed for s in subset],
        steps=settings["steps"], guidance=settings["guidance"],
    )  # fmt: skip
    _, seen = evaluation.judge(images, subset)
    recorded = {(r["prompt"], r["seed"]): r["teacher"]["seen"] for r in data["per_sample"]}
    agree = sum(now == recorded[(s.prompt, s.seed)] for s, now in zip(subset, seen))
    # Another CPU may round a borderline image the other way; more than one is a real change.
    assert agree >= len(subset) - 1, f"{agree} of {len(subset)} re-drawn samples look as recorded"
