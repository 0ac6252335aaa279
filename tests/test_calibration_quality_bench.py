"""benchmarks/calibration_quality.py: the re-split comparison of spline and isotonic held-out ECE."""
from __future__ import annotations

import numpy as np

from benchmarks import calibration_quality as cq


def test_resplit_ranks_an_overfitting_isotonic_below_the_spline():
    """Few rows of an already calibrated score: isotonic's steps fit the fit half's noise, the
    penalised spline stays near the identity, so its held-out ECE is lower on most re-splits."""
    rng = np.random.default_rng(0)
    s = rng.normal(-2.0, 1.0, 600)
    y = (rng.random(600) < 1 / (1 + np.exp(-s))).astype(float)
    out = cq.resplit_ece(s, y, None, reps=20, seed=1)
    assert out["reps"] == 20 and out["rows"] == 600
    assert out["ece_spline_mean"] < out["ece_isotonic_mean"] and out["diff_mean"] < 0
    assert out["spline_le_isotonic_share"] >= 0.6
    # references: the base rate is calibrated too, so its ECE is bin noise of the same size (ECE does
    # not reward ranking); spread-out spline outputs barely tie at 1e-6, so rounding changes ~nothing
    assert 0 < out["ece_constant_mean"] < 2 * out["ece_isotonic_mean"]
    assert abs(out["ece_spline_tied_mean"] - out["ece_spline_mean"]) < 0.05 * out["ece_spline_mean"]
    # impression weights flow through (aggregated rows): same call shape, finite answer
    w = rng.integers(1, 50, 600).astype(float)
    clicks = rng.binomial(w.astype(int), 1 / (1 + np.exp(-s))).astype(float)
    weighted = cq.resplit_ece(s, clicks, w, reps=3, seed=2)
    assert np.isfinite(weighted["ece_spline_mean"]) and np.isfinite(weighted["ece_isotonic_mean"])
