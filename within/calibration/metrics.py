"""Calibration and ranking metrics for click probabilities (numpy).

Every metric takes probabilities `p` and labels `y`. Row-level data has y in {0, 1}; aggregated
rows pass `weight=impressions` and y = click counts, and each metric then counts per impression.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

_EPS_P = 1e-12


def _prep(p: Any, y: Any, weight: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"p and y must have the same length, got {p.shape[0]} and {y.shape[0]}")
    if p.size == 0:
        raise ValueError("p: empty input; metrics need at least one row")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p: probabilities must be finite and in [0, 1]; pass sigmoid(logits), not logits")
    if weight is None:
        w = np.ones_like(p)
        if np.any((y != 0) & (y != 1)):
            raise ValueError("y: labels must be 0/1; pass weight=impressions if y holds click counts")
    else:
        w = np.asarray(weight, dtype=np.float64).ravel()
        if w.shape != p.shape:
            raise ValueError(f"weight: expected length {p.shape[0]}, got {w.shape[0]}")
        if np.any(w < 0) or np.any(y < 0) or np.any(y > w + 1e-9):
            raise ValueError("weight/y: need impressions >= 0 and 0 <= clicks <= impressions")
    return p, y, w


def _equal_mass_bins(p: np.ndarray, w: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bin id per sorted row): bins of equal total weight along sorted p."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    order = np.argsort(p, kind="stable")
    cw = np.cumsum(w[order])
    total = cw[-1] if cw[-1] > 0 else 1.0
    before = cw - w[order]
    b = np.minimum((before / total * n_bins).astype(np.int64), n_bins - 1)
    return order, b


def ece(p: Any, y: Any, n_bins: int = 15, weight: Any = None) -> float:
    """Expected calibration error over equal-mass bins (Nixon et al., 2019, "adaptive" ECE).

    ECE = sum_b (W_b / W) |mean_b(p) - mean_b(y)|, with bins of equal impression mass.

    Tied predictions are split across bins in row order, so a calibrator with flat blocks
    (isotonic, a constant) is binned along the row order inside a block, not along the score: where
    the score carries a little signal, that hides miscalibration within the block. Keeping ties in
    one bin instead hides it entirely (on KAG it halved isotonic's ECE). Compare such calibrators
    on more than ECE (benchmarks/calibration_quality.py reports the spline rounded to ties beside it).
    """
    p, y, w = _prep(p, y, weight)
    order, b = _equal_mass_bins(p, w, n_bins)
    ws = np.bincount(b, w[order], n_bins)
    sp = np.bincount(b, (w * p)[order], n_bins)
    sy = np.bincount(b, y[order], n_bins)
    keep = ws > 0
    return float(np.abs(sp[keep] - sy[keep]).sum() / ws.sum())


def ece_true(p: Any, true_p: Any, n_bins: int = 15) -> float:
    """ECE against the known true probability: equal-mass bins by p, per bin |mean p - mean true_p|,
    weighted by bin mass. Only possible on simulated data, where the truth is known."""
    p = np.asarray(p, dtype=np.float64).ravel()
    t = np.asarray(true_p, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"p and true_p must have the same length, got {p.shape[0]} and {t.shape[0]}")
    if p.size == 0 or np.any(~np.isfinite(t)) or np.any((t < 0) | (t > 1)):
        raise ValueError("true_p: must be a non-empty array of probabilities in [0, 1]")
    w = np.ones_like(p)
    order, b = _equal_mass_bins(p, w, n_bins)
    ws = np.bincount(b, minlength=n_bins).astype(np.float64)
    sp = np.bincount(b, p[order], n_bins)
    st = np.bincount(b, t[order], n_bins)
    return float(np.abs(sp - st).sum() / ws.sum())


def ks_error(p: Any, y: Any, weight: Any = None) -> float:
    """KS calibration error (Gupta et al., ICLR 2021, "Calibration of neural networks using splines").

    Sort by p; KS = max_i |sum_{j<=i} p_j - sum_{j<=i} y_j| / N (N = impressions).
    """
    p, y, w = _prep(p, y, weight)
    order = np.argsort(p, kind="stable")
    diff = np.cumsum((w * p)[order] - y[order])
    return float(np.max(np.abs(diff)) / max(w.sum(), _EPS_P))


def calibration_ratio(p: Any, y: Any, weight: Any = None) -> float:
    """Predicted clicks over observed clicks, sum(w*p) / sum(y); 1 is unbiased, inf when no clicks."""
    p, y, w = _prep(p, y, weight)
    clicks = y.sum()
    return float((w * p).sum() / clicks) if clicks > 0 else float("inf")


# field values with fewer clicks are pooled in reports, so the ratio stays readable
REPORT_MIN_CLICKS = 10


def field_rce(
    p: Any, y: Any, groups_1d: Any, weight: Any = None, eps: float = 1e-6, min_clicks: float = 0.0
) -> float:
    """Field-level relative calibration error (Pan et al., WWW 2020, "Field-aware Calibration", Eq. 4).

    Field-RCE = (1/N) sum_z N_z |sum_{i in z} (y_i - p_i)| / sum_{i in z} (y_i + eps),
    with N_z the impressions of field value z and N = sum_z N_z (eps per impression, as in the paper).

    The ratio explodes for values with (almost) no clicks. With `min_clicks` > 0, values with fewer
    clicks are pooled into one "rare" value first (binary_report uses 10), so sparse ids such as
    ad groups give a readable number; min_clicks=0 is the paper's definition.
    """
    p, y, w = _prep(p, y, weight)
    g = np.asarray(groups_1d)
    if g.shape != p.shape:
        raise ValueError(f"groups_1d: expected length {p.shape[0]}, got {g.shape}")
    _, idx = np.unique(g, return_inverse=True)
    if min_clicks > 0:
        rare = np.bincount(idx, y)[idx] < min_clicks
        idx = np.where(rare, idx.max() + 1, idx)
    n_z = np.bincount(idx, w)
    y_z = np.bincount(idx, y)
    p_z = np.bincount(idx, w * p)
    keep = n_z > 0
    n_z, y_z, p_z = n_z[keep], y_z[keep], p_z[keep]
    rce = n_z * np.abs(y_z - p_z) / (y_z + eps * n_z)
    return float(rce.sum() / n_z.sum())


def brier(p: Any, y: Any, weight: Any = None) -> float:
    """Brier score per impression (Brier, 1950)."""
    p, y, w = _prep(p, y, weight)
    return float((y * (1 - p) ** 2 + (w - y) * p**2).sum() / max(w.sum(), _EPS_P))


def logloss(p: Any, y: Any, weight: Any = None) -> float:
    """Binomial negative log-likelihood per impression (p clipped to [1e-12, 1-1e-12])."""
    p, y, w = _prep(p, y, weight)
    pc = np.clip(p, _EPS_P, 1 - _EPS_P)
    return float(-(y * np.log(pc) + (w - y) * np.log1p(-pc)).sum() / max(w.sum(), _EPS_P))


def auc(p: Any, y: Any, weight: Any = None) -> float:
    """ROC AUC (sklearn). Aggregated rows expand into a click part and a non-click part with
    weights clicks and impressions - clicks. NaN when only one class is present."""
    p, y, w = _prep(p, y, weight)
    if weight is None:
        if y.min() == y.max():
            return float("nan")
        return float(roc_auc_score(y, p))
    pos, neg = y, w - y
    if pos.sum() <= 0 or neg.sum() <= 0:
        return float("nan")
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    sw = np.concatenate([pos, neg])
    keep = sw > 0
    return float(roc_auc_score(labels[keep], np.concatenate([p, p])[keep], sample_weight=sw[keep]))


def binary_report(
    p: Any,
    y: Any,
    weight: Any = None,
    groups: dict[str, Any] | None = None,
    truth: Any = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """All binary metrics in one flat dict: auc, logloss, brier, ece, ks, calib_ratio,
    field_rce/<level> per group level, and with `truth` also ece_true and oracle_auc."""
    out = {
        "auc": auc(p, y, weight),
        "logloss": logloss(p, y, weight),
        "brier": brier(p, y, weight),
        "ece": ece(p, y, n_bins=n_bins, weight=weight),
        "ks": ks_error(p, y, weight),
        "calib_ratio": calibration_ratio(p, y, weight),
    }
    for level, keys in (groups or {}).items():
        out[f"field_rce/{level}"] = field_rce(p, y, keys, weight, min_clicks=REPORT_MIN_CLICKS)
    if truth is not None:
        out["ece_true"] = ece_true(p, truth, n_bins=n_bins)
        out["oracle_auc"] = auc(np.asarray(truth, dtype=np.float64), y, weight)
    return out
