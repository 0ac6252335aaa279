"""Probability intervals (coverage of the TRUE probability) and split-conformal regression intervals."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from within.calibration.intervals import ProbabilityIntervals, SplitConformalRegressor, coverage, mean_width
from within.calibration.metrics import ece


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


TAU_ITEM, TAU_CELL = 0.30, 0.20  # sd of the item effect and of the item x context effect


def simulate(n, seed, n_items=2000, n_ctx=5, spread=None):
    """Berkson world: the score is a shrunk summary, the true logit scatters around a + b s with a
    per-item effect and an item x context effect (rows of one item / one cell share them). `spread`
    [n] scales a row's residual (its members disagree in proportion)."""
    rng = np.random.default_rng(seed)
    world = np.random.default_rng(1000)  # the same items and cells for every sample
    u_item = world.normal(0, TAU_ITEM, n_items)
    u_cell = world.normal(0, TAU_CELL, (n_items, n_ctx))
    item, ctx = rng.integers(0, n_items, n), rng.integers(0, n_ctx, n)
    s = rng.normal(-3.3, 0.8, n)
    scale = np.ones(n) if spread is None else (spread(s) if callable(spread) else spread)
    true_logit = -0.2 + 1.05 * s + scale * (u_item[item] + u_cell[item, ctx])
    keys = {"item": item, "ctx": ctx, "item_group": item // 10}  # item_group nests item: dropped
    return s, rng.binomial(1, _sigmoid(true_logit)), _sigmoid(true_logit), keys


@pytest.fixture(scope="module")
def fitted():
    s, y, _, keys = simulate(200_000, seed=0)
    return ProbabilityIntervals().fit(s, y, keys=keys)


@pytest.fixture(scope="module")
def test_set():
    return simulate(100_000, seed=1)


def test_interval_covers_true_probability_at_nominal_rate(fitted, test_set):
    s, y, true_p, _ = test_set
    p, lo, hi = fitted.interval(s, alpha=0.1)
    cov = coverage(lo, hi, true_p)
    assert 0.86 <= cov <= 0.95, cov
    assert np.all((lo <= p) & (p <= hi)) and np.all((lo >= 0) & (hi <= 1))
    assert ece(p, y) < 0.004  # the point prediction is calibrated
    # the naive interval (zero width around the calibrated p) would cover almost never
    assert coverage(p, p, true_p) < 0.01


def test_crossed_variance_components_are_recovered(fitted):
    comp = fitted.components_
    assert comp["item"] == pytest.approx(TAU_ITEM**2, abs=0.04)
    assert comp["itemxctx"] == pytest.approx(TAU_CELL**2, abs=0.04)
    assert comp["ctx"] < 0.01  # no context main effect in this world
    assert not any("item_group" in k for k in comp)  # a coarser nesting field is dropped
    assert fitted.params_["tau2"] == pytest.approx(TAU_ITEM**2 + TAU_CELL**2, abs=0.04)
    assert fitted.params_["b"] == pytest.approx(1.05, abs=0.08)


def test_spread_standard_error_matches_its_spread_over_label_redraws():
    """tau2_se is the moment noise from the labels' own Bernoulli noise: over fresh label draws of one
    world the estimates scatter by about that much, and fewer rows mean more noise and a wider band."""
    def fit(n, seed):
        s, y, _, keys = simulate(n, seed=seed)
        return ProbabilityIntervals().fit(s, y, keys=keys)

    fits = [fit(40_000, 20 + i) for i in range(8)]
    tau2 = np.array([f.params_["tau2"] for f in fits])
    se = np.array([f.params_["tau2_se"] for f in fits])
    assert 0.6 <= se.mean() / tau2.std(ddof=1) <= 1.7, (se.mean(), tau2.std(ddof=1))
    big = fit(200_000, 40)
    assert big.params_["tau2_se"] < 0.5 * se.mean()  # pairs grow with the square of the rows per unit
    low, high = fits[0].coverage_band(0.1)
    big_low, big_high = big.coverage_band(0.1)
    assert low < big_low < 0.9 < big_high < high
    assert ProbabilityIntervals(residual_var=0.1).fit(*simulate(5_000, seed=1)[:2]).coverage_band(0.1) == \
        pytest.approx((0.9, 0.9))  # a given spread has no moment noise


def test_without_keys_the_spread_is_not_identified_and_says_so(test_set):
    s, y, true_p, _ = test_set
    with pytest.raises(ValueError, match="not identified from 0/1 labels alone"):
        ProbabilityIntervals().fit(s, y)
    # a spread given from outside (here the true one) is used as is
    fixed = ProbabilityIntervals(residual_var=TAU_ITEM**2 + TAU_CELL**2).fit(s, y)
    _, lo, hi = fixed.interval(s, 0.1)
    assert 0.87 <= coverage(lo, hi, true_p) <= 0.93
    # pooled rows that share nothing carry no information on the spread: the estimate stays ~0
    rng = np.random.default_rng(3)
    alone = ProbabilityIntervals().fit(s, y, keys={"row": np.arange(s.size), "coin": rng.integers(0, 2, s.size)})
    assert alone.params_["tau2"] < 0.02


def test_weight_power_moves_the_spread_toward_the_row_average():
    """Low-CTR rows scatter more (as on the simulator). Raw pair moments (weight_power=0) weight rows by
    w^2 and land low; weight_power=1 targets the plain row average that row coverage needs."""
    def spread(s):
        return np.exp(-0.45 * (s + 3.3))

    s, y, _, keys = simulate(300_000, seed=5, spread=spread)
    row_avg = float(np.mean(spread(s) ** 2)) * (TAU_ITEM**2 + TAU_CELL**2)
    w = _sigmoid(s) * (1 - _sigmoid(s))
    w2_avg = float(np.average(spread(s) ** 2, weights=w**2)) * (TAU_ITEM**2 + TAU_CELL**2)
    assert w2_avg < 0.8 * row_avg  # the world is strongly heteroscedastic
    tau2 = {r: ProbabilityIntervals(weight_power=r).fit(s, y, keys=keys).params_["tau2"] for r in (0.0, 0.5, 1.0)}
    assert tau2[0.0] < tau2[0.5] < tau2[1.0]
    assert tau2[0.0] < 0.75 * row_avg  # measured 0.107 vs 0.168 (seed 5)
    assert tau2[1.0] == pytest.approx(row_avg, rel=0.35)  # measured 0.190
    with pytest.raises(ValueError, match="weight_power must be in"):
        ProbabilityIntervals(weight_power=1.5)


def test_member_spread_gives_row_level_widths():
    rng = np.random.default_rng(2)
    n = 200_000
    spread = np.exp(rng.normal(0, 0.4, n))
    s, y, _, keys = simulate(n, seed=2, spread=spread)
    members = s[:, None] + 0.3 * spread[:, None] * rng.normal(0, 1, (n, 6))
    pi = ProbabilityIntervals().fit(s, y, keys=keys, member_logits=members)
    spread_t = np.exp(rng.normal(0, 0.4, 100_000))
    ts, _, tp, _ = simulate(100_000, seed=4, spread=spread_t)
    tm = ts[:, None] + 0.3 * spread_t[:, None] * rng.normal(0, 1, (100_000, 6))
    _, lo, hi = pi.interval(ts, 0.1, member_logits=tm)
    assert 0.85 <= coverage(lo, hi, tp) <= 0.96
    narrow, wide = spread_t < np.quantile(spread_t, 0.2), spread_t > np.quantile(spread_t, 0.8)
    width_logit = np.log(hi / (1 - hi)) - np.log(lo / (1 - lo))
    assert width_logit[wide].mean() > 1.3 * width_logit[narrow].mean()
    # a row's interval does not depend on the other rows scored with it
    one = pi.interval(ts[:1], 0.1, member_logits=tm[:1])
    np.testing.assert_allclose([one[1][0], one[2][0]], [lo[0], hi[0]], rtol=1e-12)
    with pytest.raises(ValueError, match="member_logits: fitted with an ensemble"):
        pi.interval(ts[:5], 0.1)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 0.5), st.floats(0.01, 0.45), st.lists(st.floats(-8, 4), min_size=1, max_size=20))
def test_intervals_widen_as_alpha_falls(fitted, a1, gap, raw):
    a_small, a_big = a1, min(a1 + gap, 0.99)
    s = np.asarray(raw)
    _, lo1, hi1 = fitted.interval(s, alpha=a_small)
    _, lo2, hi2 = fitted.interval(s, alpha=a_big)
    assert np.all(lo1 <= lo2 + 1e-15) and np.all(hi1 >= hi2 - 1e-15)
    assert np.all(hi1 - lo1 > 0)


def test_probability_intervals_round_trip_and_bad_alpha(fitted, test_set):
    s = test_set[0][:1000]
    back = ProbabilityIntervals.from_dict(json.loads(json.dumps(fitted.to_dict())))
    for a, b in zip(back.interval(s, 0.2), fitted.interval(s, 0.2)):
        np.testing.assert_array_equal(a, b)
    assert back.components_ == fitted.components_
    with pytest.raises(ValueError, match="alpha must be in"):
        fitted.interval(s, alpha=1.5)


def test_split_conformal_absolute_coverage():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, 20_000)
    spend = 3 * x + rng.gamma(2.0, 2.0, x.size)
    pred = 3 * x + 4.0
    cal, test = slice(0, 5000), slice(5000, None)
    sc = SplitConformalRegressor().fit(pred[cal], spend[cal])
    lo, hi = sc.interval(pred[test], alpha=0.1)
    assert 0.88 <= coverage(lo, hi, spend[test]) <= 0.92
    lo2, hi2 = sc.interval(pred[test], alpha=0.02)
    assert mean_width(lo2, hi2) > mean_width(lo, hi)
    back = SplitConformalRegressor.from_dict(json.loads(json.dumps(sc.to_dict())))
    np.testing.assert_array_equal(back.interval(pred[test], 0.1)[0], lo)


def test_split_conformal_cqr_adapts_width():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, 20_000)
    y = rng.normal(0, 0.1 + x)  # heteroscedastic
    q_lo, q_hi = -1.2 * (0.1 + x), 1.2 * (0.1 + x)  # slightly narrow quantile model
    sc = SplitConformalRegressor().fit(None, y[:5000], lower=q_lo[:5000], upper=q_hi[:5000])
    lo, hi = sc.interval(alpha=0.1, lower=q_lo[5000:], upper=q_hi[5000:])
    assert 0.88 <= coverage(lo, hi, y[5000:]) <= 0.92
    width = hi - lo
    assert width[x[5000:] > 0.8].mean() > 3 * width[x[5000:] < 0.2].mean()


def test_split_conformal_tiny_calibration_set_gives_infinite_interval():
    sc = SplitConformalRegressor().fit(np.zeros(5), np.ones(5))
    lo, hi = sc.interval(np.zeros(2), alpha=0.1)  # ceil(6 * 0.9) = 6 > 5 scores
    assert np.all(np.isinf(lo)) and np.all(np.isinf(hi))
    with pytest.raises(ValueError, match="lower/upper: pass both"):
        SplitConformalRegressor().fit(None, np.ones(5), lower=np.zeros(5))
