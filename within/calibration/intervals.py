"""Prediction intervals: for click probabilities (covering the TRUE probability) and for regression
targets (split-conformal / CQR).

Why not the binned moment estimate Var(p - p_hat) ~ mean((y - p_hat)^2) - mean(p_hat (1 - p_hat))?
For Bernoulli y, E[(y - q)^2 | p] = p(1-p) + (p-q)^2 = q(1-q) + (p-q)(1-2q) exactly, so in a bin
that estimate is (1 - 2q) * bias: the spread of the true p around p_hat cancels and cannot be
read from single 0/1 outcomes. Only E[p | p_hat] is identified by labels alone; a spread needs
structure. `ProbabilityIntervals` supplies it with an errors-in-variables model (Carroll et al.,
"Measurement Error in Nonlinear Models", 2006): the score is a noisy reading of the true logit,

    l ~ N(mu, s2_l),   s | l ~ N(l, s2_e(i)),   y | l ~ Bernoulli(sigmoid(l)),

with s2_e(i) = k0 (no ensemble) or k0 + k1 * sd(member logits)_i^2 (an ensemble's spread tells
which rows are noisier, Lakshminarayanan et al. 2017). Then l | s ~ N(m_i, v_i) with
b_i = s2_l / (s2_l + s2_e(i)), m_i = mu + b_i (s_i - mu), v_i = b_i s2_e(i). The two variances are
identified jointly: the spread of s gives s2_l + s2_e, and the attenuation of the calibration curve
P(y=1 | s) = E[sigmoid(l) | s] gives their split. All parameters are fitted by maximum likelihood
of (s, y) (Gauss-Hermite for the logistic-normal integral). The interval is the central posterior
interval [sigmoid(m - z v^0.5), sigmoid(m + z v^0.5)], and p = E[sigmoid(l) | s] is the calibrated
probability. Assumption to keep in mind: scores are raw model logits with roughly Gaussian error
around the truth, not logits that were already shrunk by another calibrator.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import norm

from within.calibration.base import check_labels, check_scores

_GH_X, _GH_W = np.polynomial.hermite.hermgauss(24)
_GH_W = _GH_W / math.sqrt(math.pi)


def coverage(lo: Any, hi: Any, target: Any) -> float:
    """Share of targets inside [lo, hi]."""
    lo, hi, t = (np.asarray(a, dtype=np.float64) for a in (lo, hi, target))
    if not (lo.shape == hi.shape == t.shape):
        raise ValueError(f"coverage: lo, hi and target must have one shape, got {lo.shape}, {hi.shape}, {t.shape}")
    return float(np.mean((t >= lo) & (t <= hi)))


def mean_width(lo: Any, hi: Any) -> float:
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if lo.shape != hi.shape:
        raise ValueError(f"mean_width: lo and hi must have one shape, got {lo.shape} and {hi.shape}")
    return float(np.mean(hi - lo))


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (e.g. 0.1 for 90% intervals), got {alpha}")
    return alpha


def _member_var(member_logits: Any, n: int) -> np.ndarray:
    m = np.asarray(member_logits, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != n or m.shape[1] < 2:
        raise ValueError(f"member_logits: expected [N={n}, M>=2] logits of ensemble members, got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("member_logits: non-finite values; drop or fill them")
    return m.var(axis=1, ddof=1)


class ProbabilityIntervals:
    """Intervals for the true click probability from logits (see module docstring for the model).

    Args:
        max_fit_rows: rows used for the maximum-likelihood fit (a random subset beyond this; five
            parameters need far fewer rows than a calibrator, and it bounds the fit time).
        seed: for that subset.
    """

    def __init__(self, max_fit_rows: int = 200_000, seed: int = 0) -> None:
        if int(max_fit_rows) < 100:
            raise ValueError(f"max_fit_rows must be >= 100, got {max_fit_rows}")
        self.max_fit_rows = int(max_fit_rows)
        self.seed = int(seed)
        self.params_: dict[str, float] = {}
        self.uses_members_ = False
        self.fitted_ = False

    @staticmethod
    def _posterior(s: np.ndarray, u2: np.ndarray, mu: float, s2l: float, k0: float, k1: float):
        s2e = k0 + k1 * u2
        b = s2l / (s2l + s2e)
        return mu + b * (s - mu), b * s2e, s2l + s2e

    def fit(self, scores_logit: Any, y: Any, member_logits: Any = None, weight: Any = None) -> ProbabilityIntervals:
        s = check_scores(scores_logit, "scores_logit")
        n = s.shape[0]
        clicks, imps = check_labels(y, n, weight)
        self.uses_members_ = member_logits is not None
        u2 = _member_var(member_logits, n) if self.uses_members_ else np.zeros(n)
        if n > self.max_fit_rows:
            keep = np.random.default_rng(self.seed).choice(n, self.max_fit_rows, replace=False)
            s, u2, clicks, imps = s[keep], u2[keep], clicks[keep], imps[keep]
        var_s = float(np.var(s)) + 1e-6
        total = float(imps.sum())

        def unpack(th: np.ndarray) -> tuple[float, float, float, float]:
            k1 = float(np.exp(th[3])) if self.uses_members_ else 0.0
            return float(th[0]), float(np.exp(th[1])), float(np.exp(th[2])), k1

        def nll(th: np.ndarray) -> float:
            mu, s2l, k0, k1 = unpack(th)
            m, v, tot = self._posterior(s, u2, mu, s2l, k0, k1)
            eta = m[:, None] + np.sqrt(2 * v)[:, None] * _GH_X[None, :]
            q = np.clip(expit(eta) @ _GH_W, 1e-12, 1 - 1e-12)
            ll_y = clicks * np.log(q) + (imps - clicks) * np.log1p(-q)
            ll_s = -0.5 * (np.log(2 * np.pi * tot) + (s - mu) ** 2 / tot)
            return float(-(ll_y.sum() + ll_s.sum()) / total)

        th0 = [float(np.mean(s)), math.log(0.8 * var_s), math.log(0.2 * var_s)]
        if self.uses_members_:
            th0.append(math.log(max(0.2 * var_s / max(float(np.mean(u2)), 1e-6), 1e-6)))
        res = minimize(nll, np.asarray(th0), method="L-BFGS-B",
                       bounds=[(None, None)] + [(-20.0, 10.0)] * (len(th0) - 1))
        if not np.all(np.isfinite(res.x)):
            raise RuntimeError(f"ProbabilityIntervals: fit failed ({res.message})")
        mu, s2l, k0, k1 = unpack(res.x)
        self.params_ = {"mu": mu, "var_logit": s2l, "noise_var": k0, "noise_var_per_member_var": k1}
        self.fitted_ = True
        return self

    def _post(self, scores_logit: Any, member_logits: Any) -> tuple[np.ndarray, np.ndarray]:
        if not self.fitted_:
            raise RuntimeError("ProbabilityIntervals: not fitted; call fit(scores_logit, y) first")
        s = check_scores(scores_logit, "scores_logit")
        if self.uses_members_ and member_logits is None:
            raise ValueError("member_logits: fitted with an ensemble spread; pass member_logits [N, M] here too")
        u2 = _member_var(member_logits, s.shape[0]) if self.uses_members_ else np.zeros(s.shape[0])
        pr = self.params_
        m, v, _ = self._posterior(s, u2, pr["mu"], pr["var_logit"], pr["noise_var"], pr["noise_var_per_member_var"])
        return m, v

    def predict(self, scores_logit: Any, member_logits: Any = None) -> np.ndarray:
        """Calibrated probability E[sigmoid(l) | s]."""
        m, v = self._post(scores_logit, member_logits)
        return expit(m[:, None] + np.sqrt(2 * v)[:, None] * _GH_X[None, :]) @ _GH_W

    def interval(self, scores_logit: Any, alpha: float = 0.1, member_logits: Any = None):
        """(p, lo, hi): calibrated probability and a central 1 - alpha interval for the true one."""
        z = norm.ppf(1 - _check_alpha(alpha) / 2)
        m, v = self._post(scores_logit, member_logits)
        p = expit(m[:, None] + np.sqrt(2 * v)[:, None] * _GH_X[None, :]) @ _GH_W
        sd = np.sqrt(v)
        lo, hi = expit(m - z * sd), expit(m + z * sd)
        return p, np.minimum(lo, p), np.maximum(hi, p)

    def to_dict(self) -> dict[str, Any]:
        if not self.fitted_:
            raise RuntimeError("ProbabilityIntervals: not fitted; call fit first")
        return {"type": "probability_intervals", "params": {"max_fit_rows": self.max_fit_rows, "seed": self.seed},
                "state": {"params": self.params_, "uses_members": self.uses_members_}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbabilityIntervals:
        if d.get("type") != "probability_intervals":
            raise ValueError(f"ProbabilityIntervals.from_dict: expected type 'probability_intervals', got {d.get('type')!r}")
        obj = cls(**d["params"])
        obj.params_ = {k: float(v) for k, v in d["state"]["params"].items()}
        obj.uses_members_ = bool(d["state"]["uses_members"])
        obj.fitted_ = True
        return obj


class SplitConformalRegressor:
    """Split-conformal intervals for a regression target (spend, ROAS).

    Absolute-residual scores |y - y_hat| (Lei et al., JASA 2018), or with lower/upper quantile
    predictions the CQR score max(lo - y, y - hi) (Romano et al., NeurIPS 2019). The interval uses
    the ceil((n + 1)(1 - alpha))-th smallest calibration score, which gives marginal coverage
    >= 1 - alpha for exchangeable data. Hand-written because MAPIE is not a dependency and the
    step is a sort and an index.
    """

    def __init__(self) -> None:
        self.scores_ = np.zeros(0)
        self.mode_: str = ""

    @staticmethod
    def _arr(a: Any, name: str, n: int | None = None) -> np.ndarray:
        x = np.asarray(a, dtype=np.float64)
        if x.ndim != 1 or (n is not None and x.shape[0] != n) or not np.all(np.isfinite(x)):
            raise ValueError(f"{name}: expected a finite 1-D array{'' if n is None else f' of length {n}'}, got {x.shape}")
        return x

    def fit(self, y_pred: Any, y_true: Any, lower: Any = None, upper: Any = None) -> SplitConformalRegressor:
        """Fit on a held-out calibration split (NOT the model's training rows)."""
        yt = self._arr(y_true, "y_true")
        n = yt.shape[0]
        if (lower is None) != (upper is None):
            raise ValueError("lower/upper: pass both quantile predictions for CQR, or neither")
        if lower is not None:
            lo, hi = self._arr(lower, "lower", n), self._arr(upper, "upper", n)
            self.scores_, self.mode_ = np.sort(np.maximum(lo - yt, yt - hi)), "cqr"
        else:
            yp = self._arr(y_pred, "y_pred", n)
            self.scores_, self.mode_ = np.sort(np.abs(yt - yp)), "absolute"
        return self

    def quantile(self, alpha: float) -> float:
        if not self.mode_:
            raise RuntimeError("SplitConformalRegressor: not fitted; call fit on a calibration split first")
        n = self.scores_.shape[0]
        k = math.ceil((n + 1) * (1 - _check_alpha(alpha)))
        return float("inf") if k > n else float(self.scores_[k - 1])

    def interval(self, y_pred: Any = None, alpha: float = 0.1, lower: Any = None, upper: Any = None):
        """(lo, hi) intervals; CQR mode needs lower/upper, absolute mode needs y_pred."""
        q = self.quantile(alpha)
        if self.mode_ == "cqr":
            if lower is None or upper is None:
                raise ValueError("lower/upper: fitted in CQR mode; pass the quantile predictions")
            lo, hi = self._arr(lower, "lower"), self._arr(upper, "upper")
            return lo - q, hi + q
        if y_pred is None:
            raise ValueError("y_pred: fitted on absolute residuals; pass point predictions")
        yp = self._arr(y_pred, "y_pred")
        return yp - q, yp + q

    def to_dict(self) -> dict[str, Any]:
        if not self.mode_:
            raise RuntimeError("SplitConformalRegressor: not fitted")
        return {"type": "split_conformal", "state": {"mode": self.mode_, "scores": self.scores_.tolist()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitConformalRegressor:
        if d.get("type") != "split_conformal" or d["state"].get("mode") not in ("absolute", "cqr"):
            raise ValueError("SplitConformalRegressor.from_dict: expected a dict from to_dict()")
        obj = cls()
        obj.mode_ = d["state"]["mode"]
        obj.scores_ = np.sort(np.asarray(d["state"]["scores"], dtype=np.float64))
        return obj
