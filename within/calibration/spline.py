"""Monotone spline calibration on the logit scale.

Method: a penalised monotone regression spline (Ramsay, 1988, "Monotone Regression Splines in
Action", I-splines) fitted by binomial maximum likelihood. The calibrated logit is

    g(s) = a + c * s + sum_j beta_j * I_j(s),   c >= 0, beta_j >= 0,

where I_j(s) = sum_{m >= j} B_m(s) are cumulative B-spline bases of order `spline_order` (each
non-decreasing from 0 to 1), so g is non-decreasing by construction and linear outside the knot
range. The ridge penalty `regularization * sum beta_j^2` shrinks g toward the affine (Platt) map,
which is why already-calibrated scores come back almost unchanged. Calibration quality is reported
as the KS calibration error of Gupta et al. (ICLR 2021, "Calibration of Neural Networks using
Splines"). Fitting is L-BFGS-B with bounds and an analytic gradient: one dense N x (n_knots + k)
design matrix, no per-row Python loops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.interpolate import BSpline
from scipy.optimize import minimize
from scipy.special import expit, log_expit, log_softmax

from within.calibration.base import Calibrator, check_labels, check_scores, figure_or_file, register
from within.calibration.metrics import ks_error

_MIN_SLOPE = 1e-6  # strictly increasing map, so distinct scores keep their order
_DIAG_BINS = 15


def _ispline_basis(s: np.ndarray, knots: np.ndarray, order: int) -> np.ndarray:
    """I-spline basis I_1..I_{n-1} at s (clamped to the knot range): reverse cumulative B-splines."""
    lo, hi = knots[0], knots[-1]
    x = np.clip(s, lo, hi)
    t = np.concatenate([[lo] * order, knots, [hi] * order])
    b = BSpline.design_matrix(x, t, order).toarray()
    cum = np.cumsum(b[:, ::-1], axis=1)[:, ::-1]
    return cum[:, 1:]


def _make_knots(s: np.ndarray, n_knots: int, spacing: str, weight: np.ndarray | None = None) -> np.ndarray:
    lo, hi = float(s.min()), float(s.max())
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    levels = np.linspace(0, 1, n_knots)[1:-1]
    if spacing == "quantile" and weight is not None and np.ptp(weight) > 0:
        # aggregated rows: equal IMPRESSION mass between knots, not equal row counts
        order = np.argsort(s, kind="stable")
        cw = np.cumsum(weight[order])
        inner = np.interp(levels * cw[-1], cw - weight[order] / 2, s[order])
    elif spacing == "quantile":
        inner = np.quantile(s, levels)
    else:
        inner = np.linspace(lo, hi, n_knots)[1:-1]
    inner = np.unique(inner[(inner > lo + 1e-9) & (inner < hi - 1e-9)])
    return np.concatenate([[lo], inner, [hi]])


class _MonotoneSpline:
    """One binary monotone spline: state = knots, order, (a, c, beta)."""

    def __init__(self, knots: np.ndarray, order: int, coef: np.ndarray) -> None:
        self.knots, self.order, self.coef = knots, order, coef

    @classmethod
    def fit(cls, s: np.ndarray, clicks: np.ndarray, imps: np.ndarray, n_knots: int, spacing: str,
            order: int, lam: float) -> _MonotoneSpline:
        knots = _make_knots(s, n_knots, spacing, imps)
        basis = _ispline_basis(s, knots, order)
        x = np.column_stack([np.ones_like(s), s, basis])
        # per click, not per impression: the ridge weight then means the same at a 0.02% and a 3% rate
        total = max(float(clicks.sum()), 1.0)
        n_beta = basis.shape[1]

        def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
            eta = x @ theta
            nll = -(clicks * log_expit(eta) + (imps - clicks) * log_expit(-eta)).sum() / total
            r = (imps * expit(eta) - clicks) / total
            grad = x.T @ r
            beta = theta[2:]
            grad[2:] += 2 * lam * beta
            return float(nll + lam * beta @ beta), grad

        x0 = np.concatenate([[0.0, 1.0], np.zeros(n_beta)])
        bounds = [(None, None), (_MIN_SLOPE, None)] + [(0.0, None)] * n_beta
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 500})
        if not np.all(np.isfinite(res.x)):
            raise RuntimeError(f"SplineCalibrator: fit diverged ({res.message}); check the labels vary")
        return cls(knots, order, res.x)

    def logit(self, s: np.ndarray) -> np.ndarray:
        basis = _ispline_basis(s, self.knots, self.order)
        return self.coef[0] + self.coef[1] * s + basis @ self.coef[2:]

    def state(self) -> dict[str, Any]:
        return {"knots": self.knots.tolist(), "order": self.order, "coef": self.coef.tolist()}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> _MonotoneSpline:
        return cls(np.asarray(st["knots"], float), int(st["order"]), np.asarray(st["coef"], float))


def _reliability(p: np.ndarray, y: np.ndarray, n_bins: int = _DIAG_BINS) -> tuple[list, list]:
    order = np.argsort(p, kind="stable")
    chunks = np.array_split(order, min(n_bins, len(order)))
    return [float(p[c].mean()) for c in chunks], [float(y[c].mean()) for c in chunks]


@register("spline")
class SplineCalibrator(Calibrator):
    """Monotone I-spline calibration of logits (binary) or of one-vs-rest logits (multi-class).

    Args:
        n_knots: knots including the two boundary knots (>= 2).
        knot_spacing: 'quantile' (equal-mass knots, the default) or 'uniform' in the logit.
        spline_order: B-spline degree (3 = cubic).
        regularization: ridge weight on the I-spline coefficients; larger -> closer to Platt.
            'cv' picks it from CV_GRID by CV_FOLDS-fold cross-validated binomial deviance (folds
            interleaved along the sorted scores, so each fold spans the whole score range): the
            fixed weight is per impression, so the right one depends on the calibration set's
            size and click count.
    """

    CV_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    CV_FOLDS = 5

    def __init__(self, n_knots: int = 10, knot_spacing: str = "quantile", spline_order: int = 3,
                 regularization: float | str = 1e-3) -> None:
        if int(n_knots) < 2:
            raise ValueError(f"n_knots must be >= 2 (boundary knots included), got {n_knots}")
        if knot_spacing not in ("quantile", "uniform"):
            raise ValueError(f"knot_spacing must be 'quantile' or 'uniform', got {knot_spacing!r}")
        if int(spline_order) < 1:
            raise ValueError(f"spline_order must be >= 1, got {spline_order}")
        if isinstance(regularization, str):
            if regularization != "cv":
                raise ValueError(f"regularization must be a number >= 0 or 'cv', got {regularization!r}")
        elif float(regularization) < 0:
            raise ValueError(f"regularization must be >= 0 or 'cv', got {regularization}")
        self.n_knots = int(n_knots)
        self.knot_spacing = knot_spacing
        self.spline_order = int(spline_order)
        self.regularization = regularization if isinstance(regularization, str) else float(regularization)
        self.regularization_: float = float("nan")  # the weight used (the CV choice with 'cv')
        self.cv_scores_: dict[str, float] = {}
        self.splines_: list[_MonotoneSpline] = []
        self.n_classes_: int | None = None
        self.ks_error_: float = float("nan")
        self.ks_error_before_: float = float("nan")
        self.diagnostics_: dict[str, list] = {}

    # --- multi-class helpers -------------------------------------------------------------------
    @staticmethod
    def _ovr_logits(z: np.ndarray) -> np.ndarray:
        """Per-class logit(p_k) from multi-class logits z [N, K]: log p_k - log(1 - p_k)."""
        lp = log_softmax(z, axis=1)
        return lp - np.log(np.maximum(-np.expm1(lp), 1e-300))

    def _as_input(self, y_pred: Any) -> np.ndarray:
        a = np.asarray(y_pred, dtype=np.float64)
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim == 1:
            return check_scores(a, "y_pred")
        if a.ndim == 2 and a.shape[1] >= 2:
            if not np.all(np.isfinite(a)):
                raise ValueError("y_pred: non-finite logits; drop or fill NaN/inf before calibrating")
            return a
        raise ValueError(f"y_pred: expected logits [N] or multi-class logits [N, K], got shape {a.shape}")

    # --- API -----------------------------------------------------------------------------------
    def fit(self, y_pred: Any, y_true: Any, groups: dict | None = None, weight: Any = None) -> SplineCalibrator:
        s = self._as_input(y_pred)
        kw = {"n_knots": self.n_knots, "spacing": self.knot_spacing, "order": self.spline_order,
              "lam": self.regularization}
        if s.ndim == 1:
            clicks, imps = check_labels(y_true, s.shape[0], weight)
            if self.regularization == "cv":
                kw["lam"] = self._cv_lambda(s, clicks, imps)
            self.regularization_ = float(kw["lam"])
            self.n_classes_ = None
            self.splines_ = [_MonotoneSpline.fit(s, clicks, imps, **kw)]
            self.fitted_ = True
            rate = clicks / np.maximum(imps, 1e-12)
            p_before, p_after = expit(s), self.transform(s)
            self.ks_error_before_ = ks_error(p_before, clicks, weight)
            self.ks_error_ = ks_error(p_after, clicks, weight)
            y_diag, p_b, p_a = rate, p_before, p_after
        else:
            if weight is not None:
                raise ValueError("weight: aggregated rows are only supported for binary y_pred")
            n, k = s.shape
            yt = np.asarray(y_true)
            if yt.shape != (n,) or yt.dtype.kind not in "iub" or yt.min() < 0 or yt.max() >= k:
                raise ValueError(f"y_true: multi-class labels must be integers in [0, {k}) of shape ({n},)")
            ovr = self._ovr_logits(s)
            onehot = (yt[:, None] == np.arange(k)[None, :]).astype(np.float64)
            if self.regularization == "cv":  # one weight for all classes, by their summed deviance
                kw["lam"] = self._cv_lambda(ovr, onehot, np.ones_like(onehot))
            self.regularization_ = float(kw["lam"])
            self.n_classes_ = k
            self.splines_ = [_MonotoneSpline.fit(ovr[:, j], onehot[:, j], np.ones(n), **kw) for j in range(k)]
            self.fitted_ = True
            p_b = np.exp(log_softmax(s, axis=1))
            p_a = self.transform(s)
            self.ks_error_before_ = float(np.mean([ks_error(p_b[:, j], onehot[:, j]) for j in range(k)]))
            self.ks_error_ = float(np.mean([ks_error(p_a[:, j], onehot[:, j]) for j in range(k)]))
            y_diag, p_b, p_a = onehot.ravel(), p_b.ravel(), p_a.ravel()
        pb, yb = _reliability(p_b, y_diag)
        pa, ya = _reliability(p_a, y_diag)
        self.diagnostics_ = {"before_p": pb, "before_y": yb, "after_p": pa, "after_y": ya}
        return self

    def _cv_lambda(self, s: np.ndarray, clicks: np.ndarray, imps: np.ndarray) -> float:
        """The CV_GRID weight with the least held-out binomial deviance (ties: the larger weight).
        s, clicks, imps are [N] (binary) or [N, K] (one-vs-rest columns, deviances summed)."""
        s2, c2, i2 = (a.reshape(a.shape[0], -1) for a in (s, clicks, imps))
        n = s2.shape[0]
        folds = min(self.CV_FOLDS, n // 2)
        if folds < 2:
            return float(max(self.CV_GRID))
        fold = np.empty(n, dtype=np.int64)
        fold[np.argsort(s2[:, 0], kind="stable")] = np.arange(n) % folds
        scores = {}
        for lam in self.CV_GRID:
            dev = 0.0
            for f in range(folds):
                tr, te = fold != f, fold == f
                for j in range(s2.shape[1]):
                    sp = _MonotoneSpline.fit(s2[tr, j], c2[tr, j], i2[tr, j], self.n_knots, self.knot_spacing,
                                             self.spline_order, lam)
                    eta = sp.logit(s2[te, j])
                    dev -= float((c2[te, j] * log_expit(eta) + (i2[te, j] - c2[te, j]) * log_expit(-eta)).sum())
            scores[lam] = dev
        self.cv_scores_ = {f"{lam:g}": v for lam, v in scores.items()}
        best = min(scores.values())
        return float(max(lam for lam, v in scores.items() if v <= best + 1e-9 * abs(best)))

    def transform_logit(self, y_pred: Any, groups: dict | None = None) -> np.ndarray:
        self._require_fitted()
        s = self._as_input(y_pred)
        if self.n_classes_ is None:
            if s.ndim != 1:
                raise ValueError(f"y_pred: this calibrator was fitted on binary logits [N], got {s.shape}")
            return self.splines_[0].logit(s)
        if s.ndim != 2 or s.shape[1] != self.n_classes_:
            raise ValueError(f"y_pred: expected multi-class logits [N, {self.n_classes_}], got {s.shape}")
        ovr = self._ovr_logits(s)
        return np.column_stack([sp.logit(ovr[:, j]) for j, sp in enumerate(self.splines_)])

    def transform(self, y_pred: Any, groups: dict | None = None) -> np.ndarray:
        z = self.transform_logit(y_pred, groups)
        p = expit(z)
        if self.n_classes_ is None:
            return p
        return p / p.sum(axis=1, keepdims=True)  # one-vs-rest probabilities renormalised per row

    def get_spline_parameters(self) -> dict[str, Any]:
        """Knots and coefficients per spline (one per class when multi-class) and KS errors."""
        self._require_fitted()
        return {
            "n_classes": self.n_classes_,
            "splines": [
                {"knots": sp.knots.tolist(), "intercept": float(sp.coef[0]), "slope": float(sp.coef[1]),
                 "ispline_coef": sp.coef[2:].tolist(), "order": sp.order}
                for sp in self.splines_
            ],
            "ks_error": self.ks_error_,
            "ks_error_before": self.ks_error_before_,
            "regularization_used": self.regularization_,
        }

    def plot_calibration_curve(self, path: str | Path | None = None) -> Any:
        """Reliability curve (equal-mass bins of the fit data) before and after calibration.
        Returns the matplotlib Figure, or writes a PNG to `path` and returns the path."""
        self._require_fitted()
        from matplotlib.figure import Figure

        d = self.diagnostics_
        fig = Figure(figsize=(5, 5))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
        ax.plot(d["before_p"], d["before_y"], "o-", label=f"before (KS {self.ks_error_before_:.4f})")
        ax.plot(d["after_p"], d["after_y"], "s-", label=f"after spline (KS {self.ks_error_:.4f})")
        hi = max(max(d["before_p"] + d["after_p"] + d["before_y"]), 1e-3) * 1.05
        ax.set(xlim=(0, min(hi, 1)), ylim=(0, min(hi, 1)), xlabel="mean predicted probability",
               ylabel="observed rate", title="Reliability (equal-mass bins)")
        ax.legend(loc="upper left")
        return figure_or_file(fig, path)

    def _params(self) -> dict[str, Any]:
        return {"n_knots": self.n_knots, "knot_spacing": self.knot_spacing,
                "spline_order": self.spline_order, "regularization": self.regularization}

    def _state(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes_, "splines": [sp.state() for sp in self.splines_],
                "regularization_used": self.regularization_, "cv_scores": self.cv_scores_,
                "ks_error": self.ks_error_, "ks_error_before": self.ks_error_before_,
                "diagnostics": self.diagnostics_}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.n_classes_ = None if state["n_classes"] is None else int(state["n_classes"])
        self.splines_ = [_MonotoneSpline.from_state(st) for st in state["splines"]]
        expected = 1 if self.n_classes_ is None else self.n_classes_
        if len(self.splines_) != expected:
            raise ValueError(f"spline state: expected {expected} splines, found {len(self.splines_)}")
        self.ks_error_ = float(state["ks_error"])
        self.ks_error_before_ = float(state["ks_error_before"])
        self.diagnostics_ = dict(state["diagnostics"])
        self.regularization_ = float(state.get("regularization_used", float("nan")))
        self.cv_scores_ = {str(k): float(v) for k, v in state.get("cv_scores", {}).items()}
