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


def simulate(n, seed):
    """True p logit-normal; score = true logit + noise whose scale varies by row (0.2 to 0.8);
    five ensemble members scatter around the score with that same per-row scale."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-2.5, 1.0, n)
    noise_sd = rng.uniform(0.2, 0.8, n)
    s = true_logit + rng.normal(0, 1, n) * noise_sd
    members = s[:, None] + rng.normal(0, 1, (n, 5)) * noise_sd[:, None]
    return s, rng.binomial(1, _sigmoid(true_logit)), _sigmoid(true_logit), members


@pytest.fixture(scope="module")
def fitted():
    s, y, _, _ = simulate(40_000, seed=0)
    return ProbabilityIntervals().fit(s, y)


@pytest.fixture(scope="module")
def test_set():
    return simulate(100_000, seed=1)


def test_interval_covers_true_probability_at_nominal_rate(fitted, test_set):
    s, y, true_p, _ = test_set
    p, lo, hi = fitted.interval(s, alpha=0.1)
    cov = coverage(lo, hi, true_p)
    assert 0.85 <= cov <= 0.96, cov
    assert np.all((lo <= p) & (p <= hi)) and np.all((lo >= 0) & (hi <= 1))
    assert ece(p, y) < 0.005  # the point prediction is calibrated
    # the naive interval (zero width around the calibrated p) would cover almost never
    assert coverage(p, p, true_p) < 0.01


def test_noise_variance_is_recovered(fitted):
    # E[noise_sd^2] for noise_sd ~ U(0.2, 0.8) is 0.28
    assert fitted.params_["noise_var"] == pytest.approx(0.28, abs=0.08)
    assert fitted.params_["var_logit"] == pytest.approx(1.0, abs=0.15)


def test_member_spread_gives_row_level_widths(test_set):
    s, y, _, m = simulate(40_000, seed=2)
    pi = ProbabilityIntervals().fit(s, y, member_logits=m)
    ts, _, tp, tm = test_set
    _, lo, hi = pi.interval(ts, 0.1, member_logits=tm)
    assert 0.85 <= coverage(lo, hi, tp) <= 0.96
    spread = tm.std(axis=1)
    narrow, wide = spread < np.quantile(spread, 0.2), spread > np.quantile(spread, 0.8)
    width_logit = np.log(hi / (1 - hi)) - np.log(lo / (1 - lo))
    assert width_logit[wide].mean() > 1.3 * width_logit[narrow].mean()
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


def test_probability_intervals_round_trip_and_bad_alpha(fitted, test_set):
    s = test_set[0][:1000]
    back = ProbabilityIntervals.from_dict(json.loads(json.dumps(fitted.to_dict())))
    for a, b in zip(back.interval(s, 0.2), fitted.interval(s, 0.2)):
        np.testing.assert_array_equal(a, b)
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
