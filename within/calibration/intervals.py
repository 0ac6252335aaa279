"""Prediction intervals: for click probabilities (covering the TRUE probability) and for regression
targets (split-conformal / CQR).

Probabilities: a Berkson model for the truth given the score, with its spread identified by
row pairs that share a unit
------------------------------------------------------------------------------------------
A trained model's logit s is a regression E[l | s]-like summary (shrunk toward the mean), so the
true logit l scatters AROUND a function of s, not s around l. `ProbabilityIntervals` therefore
uses a Berkson model (Carroll et al., "Measurement Error in Nonlinear Models", 2006, ch. 1, 6):

    l_i | s_i ~ N(a + b s_i, v_i),   y_i | l_i ~ Bernoulli(sigmoid(l_i)),   v_i = tau^2 (* h_i)

and the calibrated probability is q_i = E[sigmoid(l_i) | s_i] (Gauss-Hermite). The interval is
the central interval of l_i: [sigmoid(m_i - z sqrt(v_i)), sigmoid(m_i + z sqrt(v_i))], m_i = a + b s_i.

What labels identify. Given s, the labels fix only q(s) = E[sigmoid(l) | s]: for single 0/1
outcomes E[(y - q)^2 | s] = q (1 - q) whatever the spread, and in the click regime sigmoid(l) ~
exp(l), so E[sigmoid(l) | s] ~ exp(a + b s + tau^2 / 2): tau^2 is confounded with the intercept.
The marginal likelihood of (s, y) is flat in tau (on a 20k-row simulator calib split the profile
log-likelihood moved by 0.5 nats between tau = 0 and tau = 0.6, the true value, and the maximum
sat at tau = 0), so tau is NOT fitted by likelihood here.

What identifies the spread: pairs of distinct rows that share a unit. Labels are independent
given the truth, so for rows i != j

    E[(y_i - q_i)(y_j - q_j)] = Cov(p_i, p_j)  ~  w_i w_j Cov(r_i, r_j),   w = q (1 - q),

with r = l - m the residual logit (delta method). The residual is modelled as crossed random
effects over unit keys (each key a field, or a pair of fields, e.g. ad, ad x placement, city x
hour): r_i = sum_k u_k[key_k(i)], u_k ~ N(0, tau_k^2), so Cov(r_i, r_j) = sum_k tau_k^2 [key_k(i)
= key_k(j)]. Summing the products over all pairs that share key k gives one moment equation per
key, P_k = sum_l S_kl tau_l^2 with S_kl = sum over pairs sharing k and l of w_i w_j; the tau_k^2
solve it by non-negative least squares (method of moments for crossed random effects, in the
spirit of Henderson's method and Gao & Owen, "Efficient moment calculations for variance
components in large unbalanced crossed random effects models", EJS 2017). tau^2 = sum_k tau_k^2
is the variance of the truth around a + b s that the keys can see. a, b are then fitted by
maximum likelihood with tau^2 fixed, and the two steps alternate (q depends on a, b, tau).

Which average of the spread. With raw residuals each pair counts with weight w_i w_j, so tau^2 is
a w^2-weighted mean of the row spreads, dominated by high-CTR rows. The spread is not constant: on
the default simulator the truth's variance around a + b s falls from 0.24 (lowest score quintile) to
0.11 (highest), so the w^2-weighted mean (0.12) sits well below the row average (0.17) that row
coverage needs. Scaling row i's residual and w by w_i^-rho moves the target toward the row average
(rho = 1 is exactly the row average, but low-CTR rows then carry weights ~1/w and the estimate is
~3x noisier); `weight_power` rho = 0.5 (the default) targets the w-weighted mean. Measured on a
default run's val + calib rows (160k) over 8 label redraws from the truth: coverage of true_ctr
0.873 +- 0.025 (rho 0), 0.911 +- 0.022 (rho 0.5), 0.956 +- 0.048 (rho 1).

How many rows. The moment noise falls like 1 / rows (pairs grow with the square of the rows per
unit): on 80k calib rows the coverage over label redraws was 0.86 +- 0.13 (rho 0), on 160k
0.87 +- 0.03. The post-fit step therefore fits on val + calib together (see within/postfit/intervals.py).

Assumptions (say them when quoting coverage): the residual is (close to) a sum of effects of the
keys and their pairs; a part unique to a single row, shared by no pair, is not seen, which
narrows the interval. On the default simulator that assumption fails by a measured margin
(benchmarks/interval_identifiability.py, seed-11 default model, 480k fresh rows): solving the same
equations on the TRUE residual, with no label noise, sees 72% of its variance (0.136 of 0.189).
The cause is the weighting, not a part no pair can see: a pair-product sum counts each cell with
the square of its rows, and the network's error is smaller on busy ads (more training rows), so
busy cells pull tau^2 down. Closed indices that weight each cell by its rows see 96% of the same
residual (and recover the truth's own variance, 1.332 of 1.338, where pair weighting gives 1.437),
but with 0/1 labels they are useless: small cells count in full, and their click products are
almost all noise (tau^2 from 0.0001 to 0.88 over 5 label redraws on 160k rows). The network's own
interactions of three or more fields are small (0.006 of its score's variance,
benchmarks/score_interactions.py).
With labels the estimate is also noisy, and NNLS clipping of the many near-zero components biases
it upward: over label redraws, 0.165 +- 0.048 on 160k fit rows (coverage 0.86 +- 0.06) and
0.131 +- 0.010 on 480k (coverage 0.84 +- 0.02). So more rows make the interval steadier but not
wider; coverage near 0.9 on 160k rows is that upward bias offsetting the unseen share, not a
property of the method. Nor is the unseen part noise that averaging removes: a model of the same world
trained on an independent sample shares error correlation 0.31-0.37 with the run, and pairs see
70-75% of the error of the two models' average (the benchmark's --partner). `params_["tau2_se"]` (the analytic moment noise) and `coverage_band`
say how far the noise alone can move coverage; nothing here measures the unseen share without
the truth. The estimate is a moment estimate from click products, so it needs many
pairs: at 3% CTR a few hundred thousand pairs per key (tens of thousands of calib rows) before
the noise is small. With an ensemble, the identified tau^2 is spread over rows in proportion to
the members' disagreement (h_i = u_i^2 / mean(u^2), clipped to [1/4, 4] and renormalised to mean
1, Lakshminarayanan et al. 2017 for the disagreement as a noise signal). Without keys the spread
is not identified: pass `residual_var` to set tau^2 yourself, or keys.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize, nnls
from scipy.special import expit
from scipy.stats import norm

from within.calibration.base import check_labels, check_scores

_GH_X, _GH_W = np.polynomial.hermite.hermgauss(24)
_GH_W = _GH_W / math.sqrt(math.pi)
_H_CLIP = (0.25, 4.0)


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


def _gh_mean(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """E[sigmoid(l)] for l ~ N(m, v), Gauss-Hermite."""
    return expit(m[:, None] + np.sqrt(2 * v)[:, None] * _GH_X[None, :]) @ _GH_W


def _codes(values: Any, n: int, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.shape != (n,):
        raise ValueError(f"keys[{name!r}]: expected shape ({n},), got {a.shape}")
    return pd.factorize(pd.Series(a).astype(str), sort=False)[0].astype(np.int64)


def pair_codes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Codes 0..K-1 of the crossed key (a, b) of two integer code arrays."""
    return pd.factorize(a * (int(b.max()) + 1) + b, sort=False)[0].astype(np.int64)


def _pair_sum(code: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """sum over ordered pairs i != j with code_i == code_j of a_i b_j."""
    k = int(code.max()) + 1
    return float((np.bincount(code, a, k) * np.bincount(code, b, k) - np.bincount(code, a * b, k)).sum())


def finest_fields(keys: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    """Codes of the fields in `keys`, without a field that another field nests (state when city is
    there): pairs sharing the finer field share the coarser one, so its effect is already in the
    finer field's variance, and keeping both only adds collinear moment equations."""
    codes = {k: _codes(v, n, k) for k, v in keys.items()}
    drop = set()
    for a, b in itertools.permutations(codes, 2):
        if a in drop or b in drop:
            continue
        ca, cb = codes[a], codes[b]
        if int(ca.max()) > int(cb.max()) and len(pd.unique(pair_codes(ca, cb))) == int(ca.max()) + 1:
            drop.add(b)  # every value of a sits in one value of b: b is coarser
        elif len(pd.unique(pair_codes(ca, cb))) == int(ca.max()) + 1 == int(cb.max()) + 1 and a < b:
            drop.add(b)  # the same partition under two names
    return {k: c for k, c in codes.items() if k not in drop}


def crossed_error_variance(
    resid: np.ndarray, w: np.ndarray, fields: Mapping[str, np.ndarray], pairs: bool = True,
    noise_var: np.ndarray | None = None,
) -> tuple[dict[str, float], float]:
    """tau_k^2 per key (fields and, with `pairs`, every pair of fields) from the moment equations in
    the module docstring, and the standard error of their sum. `resid` = y - n q (click residuals),
    `w` = n q (1 - q), fields = codes. `noise_var` (per row, the variance of `resid` from the labels'
    own Bernoulli noise) gives the standard error: pair products of independent residuals have
    Cov(P_k, P_l) = 2 sum over pairs sharing k and l of v_i v_j, carried through the least-squares
    solution on its active set (the clipping of NNLS and the signal's own variance are ignored, so
    it is a lower bound when many components sit near zero). NaN without `noise_var`."""
    names = list(fields)
    keys: list[tuple[str, ...]] = [(f,) for f in names]
    if pairs:
        keys += list(itertools.combinations(names, 2))
    cache: dict[tuple[str, ...], np.ndarray] = {}

    def code(key: tuple[str, ...]) -> np.ndarray:
        key = tuple(sorted(set(key)))
        if key not in cache:
            c = fields[key[0]]
            for f in key[1:]:
                c = pair_codes(c, fields[f])
            cache[key] = c
        return cache[key]

    k = len(keys)
    P = np.array([_pair_sum(code(key), resid, resid) for key in keys])
    S = np.zeros((k, k))
    V = np.zeros((k, k))
    for i, j in itertools.combinations_with_replacement(range(k), 2):
        c = code(keys[i] + keys[j])
        S[i, j] = S[j, i] = _pair_sum(c, w, w)
        if noise_var is not None:
            V[i, j] = V[j, i] = 2.0 * _pair_sum(c, noise_var, noise_var)
    ok = np.diag(S) > 0
    tau2 = np.zeros(k)
    se = float("nan")
    if ok.any():
        scale = np.sqrt(np.diag(S)[ok])  # each equation per unit of its own information
        A, b = S[np.ix_(ok, ok)] / scale[:, None], P[ok] / scale
        tau2[ok], _ = nnls(A, b)
        if noise_var is not None:
            active = tau2[ok] > 0
            if not active.any():  # all clipped to 0: the noise of the unconstrained solution
                active[:] = True
            # tau2_active = G P_ok, G = (A_a' A_a)^-1 A_a' diag(1 / scale)
            Aa = A[:, active]
            g = (np.linalg.pinv(Aa.T @ Aa) @ Aa.T / scale[None, :]).sum(axis=0)
            se = float(np.sqrt(max(g @ V[np.ix_(ok, ok)] @ g, 0.0)))
    return {"x".join(key): float(t) for key, t in zip(keys, tau2)}, se


class ProbabilityIntervals:
    """Intervals for the true click probability from logits (see module docstring for the model).

    Args:
        max_fit_rows: rows used for the fit (a random subset beyond this).
        seed: for that subset.
        pairs: also use pairs of key fields as keys (interactions such as ad x placement).
        residual_var: fix tau^2 instead of estimating it from keys (e.g. from a validation with
            known truth); None estimates it and then `fit` needs keys.
        n_rounds: alternations of (a, b | tau^2) and (tau^2 | a, b).
        weight_power: rho in [0, 1]; pair products are weighted by (w_i w_j)^-rho, so tau^2 is the
            w^(2 - 2 rho)-weighted mean spread (module docstring: 0.5 trades bias for noise).
    """

    def __init__(self, max_fit_rows: int = 200_000, seed: int = 0, pairs: bool = True,
                 residual_var: float | None = None, n_rounds: int = 3, weight_power: float = 0.5) -> None:
        if int(max_fit_rows) < 100:
            raise ValueError(f"max_fit_rows must be >= 100, got {max_fit_rows}")
        if residual_var is not None and not (np.isfinite(residual_var) and float(residual_var) >= 0):
            raise ValueError(f"residual_var must be a finite value >= 0 or None, got {residual_var}")
        if int(n_rounds) < 1:
            raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
        self.max_fit_rows = int(max_fit_rows)
        self.seed = int(seed)
        self.pairs = bool(pairs)
        self.residual_var = None if residual_var is None else float(residual_var)
        self.n_rounds = int(n_rounds)
        if not 0.0 <= float(weight_power) <= 1.0:
            raise ValueError(f"weight_power must be in [0, 1] (0: w^2-weighted spread, 1: row average), got {weight_power}")
        self.weight_power = float(weight_power)
        self.params_: dict[str, float] = {}
        self.components_: dict[str, float] = {}
        self.uses_members_ = False
        self.fitted_ = False

    @staticmethod
    def _fit_ab(s: np.ndarray, v: np.ndarray, clicks: np.ndarray, imps: np.ndarray, x0: np.ndarray) -> np.ndarray:
        total = float(imps.sum())

        def nll(th: np.ndarray) -> float:
            q = np.clip(_gh_mean(th[0] + th[1] * s, v), 1e-12, 1 - 1e-12)
            return float(-(clicks * np.log(q) + (imps - clicks) * np.log1p(-q)).sum() / total)

        res = minimize(nll, x0, method="L-BFGS-B", bounds=[(None, None), (1e-6, None)])
        if not np.all(np.isfinite(res.x)):
            raise RuntimeError(f"ProbabilityIntervals: fit of a, b failed ({res.message})")
        return res.x

    @staticmethod
    def _shape(u2: np.ndarray, mean_u2: float) -> np.ndarray:
        return np.clip(u2 / max(mean_u2, 1e-12), *_H_CLIP)

    def fit(self, scores_logit: Any, y: Any, keys: Mapping[str, Any] | None = None, member_logits: Any = None,
            weight: Any = None) -> ProbabilityIntervals:
        """Fit on held-out (calib) logits and labels. `keys`: {field: array[N]} of unit ids whose
        rows share parts of the model's error (ad / creative ids, categorical fields, regions);
        required unless `residual_var` is set."""
        s = check_scores(scores_logit, "scores_logit")
        n = s.shape[0]
        clicks, imps = check_labels(y, n, weight)
        if self.residual_var is None and not keys:
            raise ValueError(
                "ProbabilityIntervals: the spread of the true probability around the score is not identified "
                "from 0/1 labels alone; pass keys={field: ids} (rows that share a unit, e.g. ad_id, placement) "
                "or set residual_var")
        self.uses_members_ = member_logits is not None
        u2 = _member_var(member_logits, n) if self.uses_members_ else np.ones(n)
        key_arrays = {k: np.asarray(v) for k, v in (keys or {}).items()}
        if n > self.max_fit_rows:
            keep = np.random.default_rng(self.seed).choice(n, self.max_fit_rows, replace=False)
            s, u2, clicks, imps = s[keep], u2[keep], clicks[keep], imps[keep]
            key_arrays = {k: v[keep] if np.asarray(v).shape == (n,) else v for k, v in key_arrays.items()}
            n = s.shape[0]
        mean_u2 = float(np.mean(u2))
        h_raw = self._shape(u2, mean_u2)
        mean_h = float(h_raw.mean())
        h = h_raw / mean_h
        fields = finest_fields(key_arrays, n) if self.residual_var is None else {}
        tau2 = self.residual_var if self.residual_var is not None else 0.0
        ab = np.array([0.0, 1.0])
        comps: dict[str, float] = {}
        tau2_se = 0.0  # residual_var is given, not estimated
        for _ in range(self.n_rounds if self.residual_var is None else 1):
            ab = self._fit_ab(s, tau2 * h, clicks, imps, ab)
            if self.residual_var is not None:
                break
            m = ab[0] + ab[1] * s
            q = _gh_mean(m, tau2 * h)
            # the row's spread enters the pair products as sqrt(h_i h_j): scale the residuals by it
            resid, w = (clicks - imps * q) / np.sqrt(h), imps * q * (1 - q)
            phi = np.maximum(w, 1e-12) ** -self.weight_power  # toward the row average (docstring)
            comps, tau2_se = crossed_error_variance(resid * phi, w * phi, fields, pairs=self.pairs,
                                                    noise_var=w / h * phi**2)
            tau2 = float(sum(comps.values()))
        ab = self._fit_ab(s, tau2 * h, clicks, imps, ab) if self.residual_var is None else ab
        self.params_ = {"a": float(ab[0]), "b": float(ab[1]), "tau2": float(tau2), "mean_member_var": mean_u2,
                        "mean_h": mean_h, "tau2_se": float(tau2_se)}
        self.components_ = comps
        self.fitted_ = True
        return self

    def _post(self, scores_logit: Any, member_logits: Any) -> tuple[np.ndarray, np.ndarray]:
        if not self.fitted_:
            raise RuntimeError("ProbabilityIntervals: not fitted; call fit(scores_logit, y, keys=...) first")
        s = check_scores(scores_logit, "scores_logit")
        if self.uses_members_ and member_logits is None:
            raise ValueError("member_logits: fitted with an ensemble spread; pass member_logits [N, M] here too")
        pr = self.params_
        if self.uses_members_:
            # the same shape as in fit, renormalised with the fit's mean so a row's width does not
            # depend on the other rows of the batch
            h = self._shape(_member_var(member_logits, s.shape[0]), pr["mean_member_var"]) / pr.get("mean_h", 1.0)
        else:
            h = np.ones(s.shape[0])
        return pr["a"] + pr["b"] * s, pr["tau2"] * h

    def predict(self, scores_logit: Any, member_logits: Any = None) -> np.ndarray:
        """Calibrated probability E[sigmoid(l) | s]."""
        m, v = self._post(scores_logit, member_logits)
        return _gh_mean(m, v)

    def interval(self, scores_logit: Any, alpha: float = 0.1, member_logits: Any = None):
        """(p, lo, hi): calibrated probability and a central 1 - alpha interval for the true one."""
        z = norm.ppf(1 - _check_alpha(alpha) / 2)
        m, v = self._post(scores_logit, member_logits)
        p = _gh_mean(m, v)
        sd = np.sqrt(v)
        lo, hi = expit(m - z * sd), expit(m + z * sd)
        return p, np.minimum(lo, p), np.maximum(hi, p)

    def coverage_band(self, alpha: float = 0.1) -> tuple[float, float]:
        """Coverage the 1 - alpha intervals would have if the truth's spread were tau^2 + se or
        tau^2 - se (se: the moment noise of tau^2): how much the fitted width can be trusted. It
        says nothing of a spread that the keys cannot see (module docstring)."""
        if not self.fitted_:
            raise RuntimeError("ProbabilityIntervals: not fitted; call fit first")
        z = norm.ppf(1 - _check_alpha(alpha) / 2)
        tau2, se = self.params_["tau2"], self.params_.get("tau2_se", 0.0)
        if tau2 <= 0:
            return 0.0, 0.0
        low = 2 * norm.cdf(z * math.sqrt(tau2 / (tau2 + se))) - 1
        high = 1.0 if se >= tau2 else 2 * norm.cdf(z * math.sqrt(tau2 / (tau2 - se))) - 1
        return float(low), float(high)

    def to_dict(self) -> dict[str, Any]:
        if not self.fitted_:
            raise RuntimeError("ProbabilityIntervals: not fitted; call fit first")
        return {"type": "probability_intervals",
                "params": {"max_fit_rows": self.max_fit_rows, "seed": self.seed, "pairs": self.pairs,
                           "residual_var": self.residual_var, "n_rounds": self.n_rounds,
                           "weight_power": self.weight_power},
                "state": {"params": self.params_, "components": self.components_, "uses_members": self.uses_members_}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbabilityIntervals:
        if d.get("type") != "probability_intervals":
            raise ValueError(f"ProbabilityIntervals.from_dict: expected type 'probability_intervals', got {d.get('type')!r}")
        state = d["state"]
        if not {"a", "b", "tau2"} <= set(state.get("params", {})):
            raise ValueError("ProbabilityIntervals.from_dict: state lacks a, b, tau2 (a file from an older version?)")
        obj = cls(**{"weight_power": 0.0, **d["params"]})  # files before weight_power were fitted with 0
        obj.params_ = {k: float(v) for k, v in state["params"].items()}
        obj.components_ = {k: float(v) for k, v in state.get("components", {}).items()}
        obj.uses_members_ = bool(state["uses_members"])
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
