"""Binomial maximum likelihood for an affine map of logits, eta = slope * s + bias (scipy L-BFGS-B)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

MIN_SLOPE = 1e-6  # a positive slope keeps the map strictly increasing, so ranking is preserved


def fit_affine(
    s: np.ndarray,
    clicks: np.ndarray,
    imps: np.ndarray,
    fit_bias: bool,
    offset: np.ndarray | None = None,
) -> tuple[float, float]:
    """(slope, bias) minimising the binomial NLL of sigmoid(slope * s + bias + offset)."""
    total = max(float(imps.sum()), 1e-12)
    off = 0.0 if offset is None else offset

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[0], (theta[1] if fit_bias else 0.0)
        eta = a * s + b + off
        nll = -(clicks * log_expit(eta) + (imps - clicks) * log_expit(-eta)).sum() / total
        r = (imps * expit(eta) - clicks) / total  # d nll / d eta
        g = [float(r @ s)] + ([float(r.sum())] if fit_bias else [])
        return float(nll), np.asarray(g)

    x0 = np.array([1.0, 0.0] if fit_bias else [1.0])
    bounds = [(MIN_SLOPE, None)] + ([(None, None)] if fit_bias else [])
    res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 200})
    slope = float(res.x[0])
    bias = float(res.x[1]) if fit_bias else 0.0
    if not (np.isfinite(slope) and np.isfinite(bias)):
        raise RuntimeError(f"affine calibration diverged ({res.message}); check that labels vary")
    return slope, bias
