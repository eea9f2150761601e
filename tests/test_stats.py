"""The cluster bootstrap: deterministic, honest (about 95% coverage), and narrower with more data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.stats import Bootstrap, Estimate


def _groups(prompts: int, seeds: int) -> list[int]:
    return [p for p in range(prompts) for _ in range(seeds)]


def _hierarchical(rng: np.random.Generator, prompts: int, seeds: int, spread: float) -> np.ndarray:
    """0/1 scores: each prompt's success rate is Beta around 0.85 (``spread`` 0: all 0.85)."""
    if spread == 0:
        rates = np.full(prompts, 0.85)
    else:  # mean 0.85 whatever the spread: a = 0.85 k, b = 0.15 k
        k = 1 / spread
        rates = rng.beta(0.85 * k, 0.15 * k, size=prompts)
    return (rng.random((prompts, seeds)) < rates[:, None]).astype(float).ravel()


def test_same_seed_same_interval_other_seed_other_resamples():
    rng = np.random.default_rng(1)
    scores = rng.random(60)
    a = Bootstrap(_groups(20, 3), seed=7).mean(scores)
    b = Bootstrap(_groups(20, 3), seed=7).mean(scores)
    c = Bootstrap(_groups(20, 3), seed=8).mean(scores)
    assert a == b
    assert c.mean == a.mean and (c.low, c.high) != (a.low, a.high)


def test_interval_shrinks_as_samples_grow():
    rng = np.random.default_rng(2)
    widths = []
    for prompts, seeds in ((20, 3), (81, 3), (81, 12)):
        scores = _hierarchical(rng, prompts, seeds, spread=0.2)
        widths.append(Bootstrap(_groups(prompts, seeds)).mean(scores).half_width)
    assert widths[0] > widths[1] > widths[2] > 0


def test_constant_scores_give_a_point_and_each_prompt_carries_its_seeds():
    est = Bootstrap(_groups(10, 4)).mean(np.ones(40))
    assert est == Estimate(1.0, 1.0, 1.0, 40)
    boot = Bootstrap(_groups(10, 4), resamples=200)
    # every resample holds whole prompts: per prompt, its 4 samples have the same count
    assert (boot.weights.reshape(200, 10, 4) == boot.weights.reshape(200, 10, 4)[..., :1]).all()
    assert (boot.weights.sum(axis=1) == 40).all()


def test_two_level_weights_draw_seeds_only_from_the_drawn_prompt():
    groups = ["a"] * 2 + ["b"] * 5 + ["c"] * 3  # unequal sizes
    boot = Bootstrap(groups, resamples=300, within=True, seed=3)
    top = Bootstrap(groups, resamples=300, within=False, seed=3)
    # the same prompts are drawn; within each, as many samples as it has, from its own samples
    cluster = np.array([0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    for c in range(3):
        assert np.array_equal(boot.weights[:, cluster == c].sum(1), top.weights[:, cluster == c].sum(1))
    assert not np.array_equal(boot.weights, top.weights)


@pytest.mark.parametrize("spread", [0.0, 0.3])
def test_cluster_bootstrap_covers_the_true_mean_about_95_percent_of_the_time(spread):
    """400 independent evaluations of a known world (81 prompts x 6 seeds, mean 0.85)."""
    rng = np.random.default_rng(10)
    groups = _groups(81, 6)
    covered = 0
    for i in range(400):
        est = Bootstrap(groups, resamples=500, seed=i).mean(_hierarchical(rng, 81, 6, spread))
        covered += est.low <= 0.85 <= est.high
    # 95% +/- 2.5 binomial standard errors (1.1% each)
    assert 0.92 <= covered / 400 <= 0.98


def test_resampling_seeds_again_double_counts_seed_noise():
    """Without prompt effects, two-level intervals are ~sqrt(2) too wide (coverage ~99%)."""
    rng = np.random.default_rng(11)
    groups = _groups(81, 6)
    ratios, covered = [], 0
    for i in range(100):
        scores = _hierarchical(rng, 81, 6, spread=0.0)
        one = Bootstrap(groups, resamples=500, seed=i).mean(scores)
        two = Bootstrap(groups, resamples=500, seed=i, within=True).mean(scores)
        ratios.append(two.half_width / one.half_width)
        covered += two.low <= 0.85 <= two.high
    assert 1.25 < np.median(ratios) < 1.6
    assert covered / 100 >= 0.97


def test_paired_difference_is_narrower_than_the_two_intervals():
    rng = np.random.default_rng(4)
    groups = _groups(81, 6)
    teacher = _hierarchical(rng, 81, 6, spread=0.3)
    student = teacher.copy()
    student[rng.choice(len(student), 15, replace=False)] = 0  # the student misses a few more
    boot = Bootstrap(groups)
    diff = boot.difference(student, teacher)
    t, s = boot.mean(teacher), boot.mean(student)
    assert diff.mean == pytest.approx(s.mean - t.mean)
    assert s.overlaps(t)  # on their own the two intervals cannot tell them apart...
    assert diff.high < 0  # ...paired on the same samples, the difference is clear
    ratio = boot.ratio(student, teacher)
    assert ratio.mean == pytest.approx(s.mean / t.mean) and ratio.high < 1


def test_real_valued_scores():
    rng = np.random.default_rng(5)
    psnr = 30 + rng.normal(0, 3, size=81 * 6)
    est = Bootstrap(_groups(81, 6)).mean(psnr)
    assert est.low < est.mean < est.high
    assert est.half_width == pytest.approx(1.96 * 3 / np.sqrt(len(psnr)), rel=0.25)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.mean([1.0, 2.0]), "2 scores for 6 samples"),
        (lambda b: b.mean([1.0, 2.0, float("nan"), 1.0, 1.0, 1.0]), "finite"),
        (lambda b: b.ratio([1.0] * 6, [0.0] * 6), "mean is 0"),
    ],
)
def test_bad_scores_are_refused(call, message):
    with pytest.raises(WorkbenchError, match=message):
        call(Bootstrap(_groups(3, 2)))


def test_bad_settings_are_refused():
    with pytest.raises(WorkbenchError, match="at least one sample"):
        Bootstrap([])
    with pytest.raises(WorkbenchError, match="resamples"):
        Bootstrap([0, 1], resamples=10)
    with pytest.raises(WorkbenchError, match="level"):
        Bootstrap([0, 1], level=95)


def test_a_ratio_whose_resampled_denominator_can_be_zero_is_unbounded_not_nan():
    boot = Bootstrap([0, 0, 1, 1], resamples=400)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = boot.ratio([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0])
    assert est.mean == 2.0 and est.low == 1.0 and est.high == float("inf")
