"""famviz.study's scores against scipy.stats and hand-computed small tables."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from famviz.study import correlations, granulated_psi, kendall_tau, pearson_r, sign_error


@pytest.mark.parametrize("n, ties", [(2, False), (7, False), (30, True), (101, True)])
def test_kendall_tau_matches_scipy(n, ties):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(size=n)
    if ties:
        x, y = np.round(x * 2), np.round(y)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.3 * x + rng.normal(size=40)
    assert pearson_r(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_undefined_correlations_are_nan():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau([1], [2]))
    assert math.isnan(pearson_r([2, 2], [1, 3]))


# rows: a and b the axes, one seed; m the measure, g the gap
HAND = pd.DataFrame({
    "a": [0, 1, 0, 1], "b": [0, 0, 1, 1], "seed": 0,
    "m": [1.0, 2.0, 3.0, 4.0],
    "g": [1.0, 2.0, 4.0, 3.0],
})


def test_granulated_psi_by_hand():
    # along a: b=0 agrees (τ=1), b=1 disagrees (τ=-1) -> ψ_a = 0; along b both agree -> ψ_b = 1
    psi, per_axis = granulated_psi(HAND, "m", "g", ["a", "b"])
    assert per_axis == {"a": 0.0, "b": 1.0} and psi == 0.5


def test_granulated_psi_groups_by_seed_too():
    two = pd.concat([HAND, HAND.assign(seed=1, g=[2.0, 1.0, 3.0, 4.0])], ignore_index=True)
    # seed 1 along a: b=0 disagrees, b=1 agrees -> ψ_a = 0; along b: a=0 agrees, a=1 agrees
    psi, per_axis = granulated_psi(two, "m", "g", ["a", "b"])
    assert per_axis == {"a": 0.0, "b": 1.0}
    # without the seed as a fixed coordinate a group mixes the seeds: along b (a fixed), four
    # runs with 4 concordant pairs, 4 pairs untied in m, 6 in g -> τ-b = 4 / sqrt(4 * 6)
    _, mixed = granulated_psi(two, "m", "g", ["a", "b"], seed=None)
    assert mixed["a"] == 0.0 and mixed["b"] == pytest.approx(4 / 24 ** 0.5)


def test_none_and_nan_are_axis_values_too():
    # a train_size axis [300, None] (None: all samples) reads back as NaN from the run files
    for missing in (None, float("nan")):
        t = HAND.assign(a=[300, missing, 300, missing])
        psi, per_axis = granulated_psi(t, "m", "g", ["a", "b"])
        assert per_axis == {"a": 0.0, "b": 1.0}
        assert sign_error(t, "m", "g", ["a", "b"])[2] == {"a": 0.5, "b": 0.0}


def test_sign_error_by_hand():
    # pairs along a: (0,1) agree, (2,3) disagree; along b: (0,2), (1,3) agree
    mean, worst, per_axis = sign_error(HAND, "m", "g", ["a", "b"])
    assert per_axis == {"a": 0.5, "b": 0.0} and mean == 0.25 and worst == 0.5


def test_sign_error_counts_a_tie_as_half():
    tied = HAND.assign(m=[1.0, 1.0, 3.0, 4.0])
    _, _, per_axis = sign_error(tied, "m", "g", ["a", "b"])
    assert per_axis["a"] == 0.75  # (0,1) tie: 1/2, (2,3) disagree: 1


def _table(n=24, seed=0):
    rng = np.random.default_rng(seed)
    a, b = np.repeat(np.arange(n // 4), 4), np.tile([0, 1, 2, 3], n // 4)
    gap = rng.normal(size=n)
    return pd.DataFrame({
        "key": [f"k{i}" for i in range(n)], "a": a, "b": b, "seed": 0,
        "converged": True, "error": None, "gap": gap,
        "good": gap + 0.1 * rng.normal(size=n), "good_scrambled": rng.normal(size=n),
        "basin_volume": -gap, "basin_volume_scrambled": -gap,
    })


def test_correlations_table():
    t = _table()
    c = correlations(t, target="gap")
    assert list(c.index) == ["good", "basin_volume"]
    for col in ["tau", "tau_low", "tau_high", "psi", "psi[a]", "psi[b]", "pearson",
                "sign_error", "sign_error_max", "n", "tau_scrambled", "psi_scrambled",
                "sign_error_scrambled", "n_scrambled"]:
        assert col in c, col
    assert c.loc["good", "tau"] == pytest.approx(stats.kendalltau(t.good, t.gap).statistic)
    assert c.loc["good", "pearson"] == pytest.approx(stats.pearsonr(t.good, t.gap).statistic)
    assert c.loc["good", "tau_low"] <= c.loc["good", "tau"] <= c.loc["good", "tau_high"]
    assert c.loc["good", "tau"] > 0.7 and abs(c.loc["good", "tau_scrambled"]) < 0.5
    # a larger basin is flatter: it enters negated, so a perfect predictor scores +1
    assert c.loc["basin_volume", "tau"] == 1.0 and c.loc["basin_volume", "sign_error"] == 0.0
    assert c.attrs["axes"] == ["a", "b"] and (c["n"] == 24).all()
    pd.testing.assert_frame_equal(c, correlations(t, target="gap"))  # seeded bootstrap


def test_left_out_runs_are_counted():
    t = _table()
    t.loc[0, "converged"] = False
    t.loc[1, "error"] = "ValueError: boom"
    c = correlations(t)
    assert c.attrs["left_out"] == {"error": 1, "not_converged": 1}
    assert (c["n"] == 22).all()
    assert (correlations(t, converged_only=False)["n"] == 23).all()


def test_correlations_refuses_bad_arguments():
    t = _table()
    with pytest.raises(ValueError, match="target 'gapp'"):
        correlations(t, target="gapp")
    with pytest.raises(ValueError, match="counterpart; valid: \\['good', 'basin_volume'\\]"):
        correlations(t, measures=["gap"])
    with pytest.raises(ValueError, match="unknown scramble"):
        correlations(t, scramble="t9")
