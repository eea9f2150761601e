"""Reward-guided latent consistency distillation (RG-LCD): reward models, the reward term,
its options' checks, and the shipped toy proxy of the checker."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.reward import LatentRewardModel, RewardConfig, load_reward, save_reward
from workbench.testing import LCD_RUN, random_text_inputs, run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _reward(tokens=16, pooled=8, channels=4, seed=0) -> LatentRewardModel:
    torch.manual_seed(seed)
    config = RewardConfig(
        latent_channels=channels, token_dim=tokens, pooled_dim=pooled, heads=("a", "b"), width=8
    )
    return LatentRewardModel(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def lcd_parts(tiny_teacher):
    """(student, LCD setup, batch, targets) on the tiny SDXL UNet (text width 16, pooled 8)."""
    from workbench import losses
    from workbench.testing import lcd_parts

    teacher, student, setup, batch = lcd_parts(tiny_teacher, timesteps=(300, 900))
    return student, setup, batch, losses.lcd_targets(teacher, batch, setup)


def _loss_and_grads(student, setup, batch, targets):
    from workbench.losses import lcd_objective

    student = copy.deepcopy(student).train().requires_grad_(True)
    terms = lcd_objective(batch, student, student, targets, setup)
    terms["loss/total"].backward()
    return terms, torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


def test_the_reward_term_changes_the_loss_and_the_gradient(lcd_parts):
    import dataclasses

    student, setup, batch, targets = lcd_parts
    reward = _reward()
    plain, g_plain = _loss_and_grads(student, setup, batch, targets)
    guided_setup = dataclasses.replace(setup, reward=reward, reward_weight=2.0)
    guided, g_guided = _loss_and_grads(student, guided_setup, batch, targets)
    assert "loss/reward" not in plain and set(guided) == {"loss/lcd", "loss/reward", "loss/total"}
    assert guided["loss/lcd"].item() == pytest.approx(plain["loss/lcd"].item(), abs=1e-7)
    assert guided["loss/reward"].item() < 0  # a log-probability
    expected = plain["loss/total"].item() - 2.0 * guided["loss/reward"].item()
    assert guided["loss/total"].item() == pytest.approx(expected, rel=1e-6)
    assert (g_guided - g_plain).abs().max() > 1e-6  # the reward's gradient reaches the student
    assert all(p.grad is None for p in reward.parameters())  # the reward model stays frozen


def test_reward_gradient_climbs_the_score():
    reward, gen = _reward(), torch.Generator().manual_seed(1)
    latents, cond = torch.randn(3, 4, 8, 8, generator=gen, requires_grad=True), random_text_inputs(gen, 3)
    score = reward(latents, cond)
    assert score.shape == (3,) and (score <= 0).all()
    (grad,) = torch.autograd.grad(score.sum(), latents)
    with torch.no_grad():
        assert (reward(latents + 0.05 * grad, cond) > score).all()


def test_reward_folder_round_trips_and_is_checked_against_the_base(tmp_path):
    from workbench.models import resolve_base
    from workbench.reward import check_reward_spec

    model = _reward(tokens=96, pooled=32)
    save_reward(model, tmp_path / "r")
    loaded = load_reward(str(tmp_path / "r"), resolve_base("toy"))
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 16, 16, generator=gen), random_text_inputs(gen, 2, 96, 32)
    assert torch.equal(loaded(x, cond), model(x, cond)) and not loaded.training
    save_reward(_reward(tokens=96, pooled=32, channels=3), tmp_path / "three")
    with pytest.raises(WorkbenchError, match="reads latent channels 3 but the base's UNet has 4"):
        check_reward_spec(str(tmp_path / "three"), resolve_base("toy"))
    with pytest.raises(WorkbenchError, match="text token width 16 but the base's UNet has 96"):
        save_reward(_reward(), tmp_path / "narrow")
        load_reward(str(tmp_path / "narrow"), resolve_base("toy"))


USER_FILE = """
import torch

def brightness(latents, cond):
    return latents.mean(dim=(1, 2, 3))

def make():
    return lambda latents, cond: -latents.pow(2).mean(dim=(1, 2, 3))

class Scorer(torch.nn.Module):
    latent_channels = 3
    def forward(self, latents, cond):
        return latents.sum(dim=(1, 2, 3))

NOT_CALLABLE = 3
"""


def test_load_reward_takes_a_users_file_scorer_or_factory(tmp_path):
    from workbench.models import resolve_base

    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent(USER_FILE))
    x = torch.ones(2, 4, 8, 8)
    assert load_reward(f"{path}:brightness")(x, {}).tolist() == [1.0, 1.0]
    assert load_reward(f"{path}:make")(x, {}).tolist() == [-1.0, -1.0]  # a factory, called once
    with pytest.raises(WorkbenchError, match="reads 3 latent channels but the base's UNet has 4"):
        load_reward(f"{path}:Scorer", resolve_base("toy"))
    with pytest.raises(WorkbenchError, match="has no 'missing'"):
        load_reward(f"{path}:missing")
    with pytest.raises(WorkbenchError, match="is not callable"):
        load_reward(f"{path}:NOT_CALLABLE")
    assert load_reward("torch.nn.functional:mse_loss")(x, x).item() == 0.0  # package.module:name


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no-such-thing", "not a folder and not of a known form; give a reward folder"),
        ("missing.py:score", "no file 'missing.py'"),
        ("no_such_package.mod:score", "no module 'no_such_package.mod'"),
        ("toy:", "not a folder and not of a known form"),
    ],
)
def test_unreadable_reward_specs_name_the_valid_forms(spec, match):
    from workbench.reward import parse_reward_spec

    with pytest.raises(WorkbenchError, match=match) as err:
        parse_reward_spec(spec)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- options and preflight


def _config(base, steps=3, **changes):
    """An lcd run of 3 steps guided by the toy's reward."""
    return run_config(base, steps=steps, **(LCD_RUN | {"lcd_reward": "toy", "lcd_reward_weight": 0.1} | changes))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lcd_reward": None}, "--lcd-reward-weight 0.1 asks for reward guidance but there is no reward"),
        ({"lcd_reward_weight": 0.0}, "--lcd-reward 'toy' is given but --lcd-reward-weight is 0"),
        ({"lcd_reward_weight": -1.0}, "--lcd-reward-weight must be >= 0"),
        ({"objectives": ()}, "--lcd-reward guides an lcd stage, but no stage is lcd"),
        ({"lcd_reward": "nowhere/at/all"}, "--lcd-reward: reward 'nowhere/at/all' is not a folder"),
        ({"lcd_reward": "  "}, "--lcd-reward is empty; give a reward folder"),
    ],
)
def test_bad_reward_options_fail_before_anything_loads(perturbed_pipeline, changes, match):
    from workbench.distill_config import preflight

    with pytest.raises(WorkbenchError, match=match) as err:
        preflight(_config(perturbed_pipeline, **changes))
    assert "\n" not in str(err.value)


def test_a_reward_for_another_base_fails_preflight(perturbed_pipeline, tmp_path):
    from workbench.distill_config import preflight

    save_reward(_reward(), tmp_path / "tiny")  # text width 16: the tiny pipeline's is 96
    with pytest.raises(WorkbenchError, match="text token width 16 but the base's UNet has 96"):
        preflight(_config(perturbed_pipeline, lcd_reward=str(tmp_path / "tiny")))
    assert preflight(_config(perturbed_pipeline)).config.lcd_reward == "toy"
    (tmp_path / "scorers.py").write_text("def score(latents, cond):\n    return latents.mean((1, 2, 3))\n")
    with pytest.raises(WorkbenchError, match="--lcd-reward: reward .*scorers.py:scroe.*has no 'scroe'"):
        preflight(_config(perturbed_pipeline, lcd_reward=f"{tmp_path / 'scorers.py'}:scroe"))
    assert preflight(_config(perturbed_pipeline, lcd_reward=f"{tmp_path / 'scorers.py'}:score"))


def test_cli_flags_set_the_reward():
    from workbench.cli import build_parser
    from workbench.commands.distill import config_from_args

    args = build_parser().parse_args(
        ["distill", "--stages", "segmind-vega,lcd", "--steps", "2", "--run-dir", "x",
         "--lcd-reward", "toy", "--lcd-reward-weight", "0.05"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.lcd_reward == "toy" and config.lcd_reward_weight == 0.05


def test_model_card_names_the_reward_without_local_paths():
    from workbench.reward import public_name

    assert public_name("/home/me/rewards/mine.py:score") == "`mine.py:score`"
    assert public_name("/home/me/rewards/aesthetic") == "the reward model `aesthetic`"
    assert public_name("pkg.mod:score") == "`pkg.mod:score`" and "toy" in public_name("toy")


# --------------------------------------------------------------------------- the shipped toy proxy

# Measured by `python -m workbench.toy.reward` on held-out renders (metrics.json); the test asks
# for less on its small sample.
TOY_FULL_PROMPT_ACCURACY = 0.85
TOY_FULL_PROMPT_AUC = 0.9


def test_the_toy_proxy_agrees_with_the_checker_on_held_out_renders():
    """Held-out scenes rendered through the toy VAE, each with its caption and two changed
    ones: the proxy's full-prompt verdicts against the checker's (no diffusion sampling)."""
    import random

    from workbench.models import freeze_pipeline, load_pipeline, resolve_base
    from workbench.toy import reward as toy
    from workbench.toy import world

    pipe = freeze_pipeline(load_pipeline("toy"))
    proxy = load_reward("toy", resolve_base("toy"))
    rng, scenes = random.Random(7), world.held_out_scenes()
    picked = [world.sample_scene(rng, scenes) for _ in range(32)]
    images = torch.stack([toy._pixels(world.render(s, seed=rng.randrange(2**31))) for s in picked])
    latents = toy.encode_images(pipe, images)
    seen = [toy.checker.describe(image) for image in toy.decode(pipe, latents)]
    rows, prompts, labels = [], [], []
    for i, scene in enumerate(picked):
        for prompt in [scene.caption, *toy.swapped_captions(scene, scenes, rng, 2)]:
            rows.append(i)
            prompts.append(prompt)
            labels.append(min(toy.verdicts(seen[i], prompt)))
    cond = toy.text_inputs(pipe, prompts)
    with torch.no_grad():
        score = proxy(latents[torch.tensor(rows)], cond)
    labels = torch.tensor(labels)
    accuracy = ((score > -0.6931) == (labels > 0.5)).float().mean().item()
    assert 0.2 < labels.mean() < 0.8  # both verdicts occur
    assert accuracy >= TOY_FULL_PROMPT_ACCURACY, accuracy
    assert toy.auc(score, labels) >= TOY_FULL_PROMPT_AUC


# --------------------------------------------------------------------------- an RG-LCD run


@pytest.mark.slow
def test_rg_lcd_run_logs_the_reward_resumes_exactly_and_names_it_in_the_card(perturbed_pipeline, tmp_path):
    from workbench.runs import RunDir
    from workbench.testing import straight_and_resumed

    def by_step(rows):
        return {r["step"]: (r["loss/lcd"], r["loss/reward"], r["loss/total"]) for r in rows}

    reference, resumed = map(by_step, straight_and_resumed(_config(perturbed_pipeline), tmp_path))
    assert sorted(resumed) == [0, 1, 2]
    for step, values in reference.items():
        assert resumed[step] == pytest.approx(values, abs=1e-6), step
        lcd, reward, total = values
        assert total == pytest.approx(lcd - 0.1 * reward, abs=1e-6)
    card = (RunDir(tmp_path / "straight").student / "README.md").read_text()
    assert "reward-guided (RG-LCD): 0.1 x the mean reward" in card and "toy checker's latent proxy" in card
