"""The rank correlation the KD ablation reports between FID (or KID, PSNR) and the toy
checker's full-prompt accuracy across its students (benchmarks/scoring.py)."""

import importlib.util

import numpy as np
import pytest

from workbench.testing import ROOT


@pytest.fixture(scope="module")
def scoring():
    spec = importlib.util.spec_from_file_location("scoring", ROOT / "benchmarks" / "scoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ACCURACY = {"undistilled": 0.33, "task": 0.90, "output": 0.946, "block": 0.955, "layer": 0.961}


def test_monotone_figures_give_plus_or_minus_one(scoring):
    fid = {n: 10.0 / a**3 for n, a in ACCURACY.items()}  # falls as accuracy rises, not linearly
    psnr = {n: 20 + 15 * a**2 for n, a in ACCURACY.items()}
    assert scoring.rank_correlation(fid, ACCURACY)["rho"] == pytest.approx(-1.0)
    assert scoring.rank_correlation(psnr, ACCURACY)["rho"] == pytest.approx(1.0)
    assert scoring.rank_correlation(fid, ACCURACY)["n"] == 5


def test_one_swap_lowers_rho_to_spearmans_formula(scoring):
    fid = {"undistilled": 5.0, "task": 4.0, "output": 2.0, "block": 3.0, "layer": 1.0}  # output/block swapped
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)) with the two swapped ranks off by 1 each
    assert scoring.rank_correlation(fid, ACCURACY)["rho"] == pytest.approx(-(1 - 6 * 2 / (5 * 24)))


def test_ties_share_the_average_rank(scoring):
    x = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 3.0}
    y = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    expected = np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    got = scoring.rank_correlation(x, y)
    assert got["rho"] == pytest.approx(expected)
    assert got["rho"] < 1.0


def test_only_names_both_figures_have_count(scoring):
    fid = {"layer": 1.0, "task": 3.0, "undistilled": 9.0, "teacher": 0.0}  # order and extras differ
    got = scoring.rank_correlation(fid, ACCURACY)
    assert got["n"] == 3 and sorted(got["names"]) == ["layer", "task", "undistilled"]
    assert got["rho"] == pytest.approx(-1.0)


def test_undefined_rho_is_none(scoring):
    assert scoring.rank_correlation({"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 0.9})["rho"] is None  # n < 3
    flat = {"a": 0.9, "b": 0.9, "c": 0.9}
    assert scoring.rank_correlation({"a": 1.0, "b": 2.0, "c": 3.0}, flat)["rho"] is None  # constant
