"""Drift statistics: false-alarm rates under no drift, power on a known shift, and exact values."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from within.monitoring.drift import (
    PageHinkley,
    calibration_drift,
    calibration_ratio,
    chi2_categorical,
    ks,
    psi,
    psi_categorical,
    segment_calibration_drift,
)


def _row_loss(p, y):
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def test_psi_value_by_hand_and_its_null_p_values():
    ref = np.repeat([0.0, 1.0], [50, 50])
    cur = np.repeat([0.0, 1.0], [80, 20])
    got = psi(ref, cur, bins=2)
    assert got.statistic == pytest.approx(0.3 * np.log(0.8 / 0.5) + (-0.3) * np.log(0.2 / 0.5))
    assert got.details["level"] == "major"
    rng = np.random.default_rng(0)
    p = np.array([psi(rng.normal(size=2000), rng.normal(size=2000)).p_value for _ in range(300)])
    assert 0.02 <= np.mean(p < 0.05) <= 0.09  # the chi-square reading of PSI holds its level
    shifted = psi(rng.normal(size=2000), rng.normal(0.3, 1.0, size=2000), alpha=0.001)
    assert shifted.drifted and shifted.p_value < 1e-10


def test_categorical_tests_see_a_new_mix():
    rng = np.random.default_rng(1)
    ref = rng.choice(["mobile", "desktop", "tablet"], 3000, p=[0.6, 0.3, 0.1])
    same = rng.choice(["mobile", "desktop", "tablet"], 3000, p=[0.6, 0.3, 0.1])
    moved = rng.choice(["mobile", "desktop", "tablet"], 3000, p=[0.45, 0.45, 0.1])
    assert not chi2_categorical(ref, same, alpha=0.01).drifted
    assert chi2_categorical(ref, moved, alpha=0.01).drifted
    res = psi_categorical(ref, moved, "feature:device", alpha=0.01)
    assert res.drifted and set(res.details["most_changed"][:2]) == {"mobile", "desktop"}
    assert ks(rng.normal(size=500), rng.normal(size=500) + 1.0, alpha=0.01).drifted


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=60), st.lists(st.sampled_from("abcde"), min_size=1, max_size=60))
def test_psi_is_symmetric_non_negative_and_zero_on_itself(a, b):
    ab, ba = psi_categorical(a, b).statistic, psi_categorical(b, a).statistic
    assert ab >= 0 and ab == pytest.approx(ba, rel=1e-9, abs=1e-12)
    assert psi_categorical(a, a).statistic == pytest.approx(0.0, abs=1e-12)


def test_calibration_ratio_interval_and_change_test():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.01, 0.06, 20_000)
    y = (rng.random(p.size) < p).astype(float)
    r = calibration_ratio(p, y)
    assert r["observed_over_predicted"] == pytest.approx(y.sum() / p.sum())
    assert r["low"] < 1.0 < r["high"]
    nulls = []
    for _ in range(200):
        p2 = rng.uniform(0.01, 0.06, 5000)
        nulls.append(calibration_drift(p, y, p2, (rng.random(p2.size) < p2).astype(float)).p_value)
    assert np.mean(np.array(nulls) < 0.05) <= 0.09
    y_up = (rng.random(p.size) < 1.3 * p).astype(float)  # 30% more clicks than predicted
    res = calibration_drift(p, y, p, y_up, alpha=0.001)
    assert res.drifted and res.statistic == pytest.approx(1.3, abs=0.08)


def test_segment_test_sees_drifts_that_cancel_overall():
    rng = np.random.default_rng(3)
    n = 40_000
    seg = rng.integers(0, 20, n).astype(str)
    p = rng.uniform(0.02, 0.05, n)
    y_ref = (rng.random(n) < p).astype(float)
    factor = np.where(seg.astype(int) % 2 == 0, 1.35, 0.65)  # half the accounts up, half down
    y_cur = (rng.random(n) < p * factor).astype(float)
    assert not calibration_drift(p, y_ref, p, y_cur, alpha=0.01).drifted
    res = segment_calibration_drift(seg, p, y_ref, seg, p, y_cur, "segment:account_id", alpha=0.01)
    assert res.drifted and res.details["segments_tested"] == 20
    worst = res.details["segments"][0]
    assert worst["ratio_change"] > 1.2 or worst["ratio_change"] < 0.8
    y_same = (rng.random(n) < p).astype(float)
    assert not segment_calibration_drift(seg, p, y_ref, seg, p, y_same, alpha=0.01).drifted


def test_page_hinkley_false_alarms_and_detection():
    rng = np.random.default_rng(4)
    test = PageHinkley(delta=0.05, alpha=0.05)
    p_ref = rng.uniform(0.01, 0.06, 5000)
    ref = _row_loss(p_ref, (rng.random(p_ref.size) < p_ref).astype(float))
    alarms = 0
    for _ in range(60):
        p = rng.uniform(0.01, 0.06, 20_000)
        alarms += test.run(ref, _row_loss(p, (rng.random(p.size) < p).astype(float))).drifted
    assert alarms / 60 <= 0.1  # at most about alpha (the threshold is conservative)
    p = rng.uniform(0.01, 0.06, 20_000)
    truth = np.where(np.arange(p.size) >= 10_000, np.minimum(3 * p, 0.5), p)  # the model misses a tripling
    res = test.run(ref, _row_loss(p, (rng.random(p.size) < truth).astype(float)))
    assert res.drifted and res.details["alarm_at_row"] >= 10_000
    assert test.threshold(ref, 100_000)[2] > test.threshold(ref, 1000)[2]  # longer streams, higher bar
    with pytest.raises(ValueError, match=r"PageHinkley.alpha: must be in \(0, 1\), got 1.5"):
        PageHinkley(alpha=1.5)
    with pytest.raises(ValueError, match="no finite values"):
        ks([np.nan], [1.0])


def test_drift_benchmark_stream_detects_an_injected_shift():
    """benchmarks.drift_detection on a short stream: the device-mix drift is found at its window."""
    from benchmarks.drift_detection import run_seed

    out = run_seed(0, "covariate", window=4000, windows=6, references=[1])[1]
    assert out["onset_window"] == 5 and out["pre_drift_checks"] == 4
    assert out["detected_window"] == 5 and "psi:feature:device" in out["fired_at_detection"]
