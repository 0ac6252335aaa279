"""Empirical-Bayes additive logit offsets per group (shared by hierarchical and geospatial).

Each group g gets an offset d_g on the logit scale with a Gaussian prior N(0, tau^2), i.e. it is
shrunk toward its parent (whose offset is already in the base logit). The posterior mode is found
by Newton steps on the penalised binomial likelihood, vectorised with np.bincount. tau^2 is either
given (prior precision 1/tau^2) or estimated by the method of moments of DerSimonian & Laird (1986)
from the per-group one-step estimates and their sampling variances.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit

MIN_TAU2 = 1e-6  # floor: tau^2 = 0 would mean "no group differs", a point prior we never need


def dersimonian_laird_tau2(d: np.ndarray, info: np.ndarray) -> float:
    """Between-group variance of true offsets from estimates d with sampling variance 1/info."""
    ok = info > 1e-12
    d, w = d[ok], info[ok]
    if d.size < 2:
        return MIN_TAU2
    mean = (w * d).sum() / w.sum()
    q = (w * (d - mean) ** 2).sum()
    denom = w.sum() - (w**2).sum() / w.sum()
    return float(max((q - (d.size - 1)) / max(denom, 1e-12), MIN_TAU2))


def fit_offsets(
    eta_other: np.ndarray,
    clicks: np.ndarray,
    imps: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    prior_precision: float | None,
    init: np.ndarray | None = None,
    newton_steps: int = 10,
) -> tuple[np.ndarray, float]:
    """(offsets [n_groups], prior precision used). `eta_other` is every other term of the logit."""
    delta = np.zeros(n_groups) if init is None else init.astype(np.float64).copy()
    if prior_precision is None:
        p = expit(eta_other + delta[codes])
        score = np.bincount(codes, clicks - imps * p, n_groups)
        info = np.bincount(codes, imps * p * (1 - p), n_groups)
        raw = delta + np.divide(score, info, out=np.zeros(n_groups), where=info > 1e-12)
        lam = 1.0 / dersimonian_laird_tau2(raw, info)
    else:
        lam = float(prior_precision)
    for _ in range(newton_steps):
        p = expit(eta_other + delta[codes])
        grad = np.bincount(codes, clicks - imps * p, n_groups) - lam * delta
        hess = np.bincount(codes, imps * p * (1 - p), n_groups) + lam
        step = grad / hess
        delta += np.clip(step, -2.0, 2.0)  # damped: a group with no clicks cannot run to -inf
        if np.max(np.abs(step)) < 1e-8:
            break
    return delta, lam


def backfit(
    base_eta: np.ndarray,
    clicks: np.ndarray,
    imps: np.ndarray,
    codes: list[np.ndarray],
    sizes: list[int],
    smoothing: float | None,
    max_iter: int,
    tol: float,
    init: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[float], int]:
    """Fit one offset vector per level in turn (parent first), repeating up to `max_iter` passes
    (backfitting, Hastie & Tibshirani 1990). Returns (offsets, prior precisions, passes run)."""
    offsets = [np.zeros(k) for k in sizes] if init is None else [o.copy() for o in init]
    precisions = [0.0] * len(codes)
    total = base_eta + sum((o[c] for o, c in zip(offsets, codes)), np.zeros_like(base_eta))
    passes = 0
    for passes in range(1, max_iter + 1):
        moved = 0.0
        for lvl, c in enumerate(codes):
            old = offsets[lvl]
            other = total - old[c]
            new, lam = fit_offsets(other, clicks, imps, c, len(old), smoothing, init=old)
            total = other + new[c]
            moved = max(moved, float(np.max(np.abs(new - old), initial=0.0)))
            offsets[lvl], precisions[lvl] = new, lam
        if moved < tol:
            break
    return offsets, precisions, passes
