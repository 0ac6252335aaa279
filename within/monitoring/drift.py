"""Drift statistics: each compares a current window with a reference window and returns a p-value,
so one significance level (PerformanceMonitor.alert_threshold) governs every test.

* `psi` / `psi_categorical`: population stability index over reference-decile bins (or categories),
  PSI = sum_i (c_i - r_i) ln(c_i / r_i), the effect size, with the usual reading (< 0.1 stable,
  0.1-0.25 moderate, > 0.25 major) beside it. Its p-value is the Pearson chi-square test of
  homogeneity of the same bin counts (PSI is a symmetrised KL divergence whose second-order term
  is that statistic; reading PSI / (1/n + 1/m) as chi2 directly held only 7% at a 5% level on
  tied values such as budgets, the chi-square test of the counts holds its level).
* `ks`: two-sample Kolmogorov-Smirnov (scipy.stats.ks_2samp) for numeric features and scores.
* `chi2_categorical`: chi-square test of homogeneity of category counts (scipy.stats.chi2_contingency).
* `calibration_ratio`: observed / predicted clicks of one window with a Clopper-Pearson (binomial)
  interval (the inverse of the metric `calib_ratio`, predicted / observed, of within.calibration.metrics); `calibration_drift`: did that ratio change from the reference? With O ~ Poisson(r E) in
  each window, O_cur given O_ref + O_cur is Binomial(O_ref + O_cur, E_cur / (E_ref + E_cur)) when
  the ratio r is the same in both (an exact conditional test, scipy.stats.binomtest).
* `segment_calibration_drift`: the same per segment value (account, region, ...), combined into one
  chi-square over segments, so a drift that moves accounts in opposite directions (and leaves the
  overall ratio at 1) is still seen. Segments with fewer than `min_clicks` clicks are pooled.
* `PageHinkley`: a sequential test for an increase in the mean of a stream (here the per-row log
  loss). With centre c (the reference mean plus 2 standard errors) and tolerance delta,
  m_t = sum (x_i - c - delta), PH_t = m_t - min m; alarm at PH_t > lambda. Under no change the walk
  drifts down by at least delta per step; lambda solves Siegmund's approximation of the mean run
  length to a false alarm, ARL0 = (e^(R lambda) - 1 - R lambda) / (R delta) = n / alpha for a
  stream of n rows, with R the walk's adjustment coefficient (mean exp(R z) = 1) estimated on the
  reference (so the skew of a per-row log loss, rare large values, is accounted for).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

PSI_MODERATE, PSI_MAJOR = 0.1, 0.25
_EPS = 1e-4  # share floor in PSI, so an empty bin gives a large but finite term


@dataclasses.dataclass(frozen=True)
class DriftResult:
    """One test of one subject: `drifted` when p_value < threshold (or, for Page-Hinkley, statistic > threshold)."""

    test: str
    subject: str
    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        raise ValueError(f"{name}: no finite values to compare")
    return a


def _psi_value(ref_share: np.ndarray, cur_share: np.ndarray) -> float:
    r = np.maximum(ref_share, _EPS)
    c = np.maximum(cur_share, _EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def _psi_result(subject: str, table: np.ndarray, alpha: float, extra: dict) -> DriftResult:
    """PSI of a 2 x B table of (reference, current) counts, p-value from its chi-square test."""
    n, m = int(table[0].sum()), int(table[1].sum())
    value = _psi_value(table[0] / max(n, 1), table[1] / max(m, 1))
    used = table[:, table.sum(axis=0) > 0]
    bins = used.shape[1]
    p = float(stats.chi2_contingency(used, correction=False)[1]) if bins > 1 else 1.0
    level = "major" if value > PSI_MAJOR else "moderate" if value > PSI_MODERATE else "stable"
    return DriftResult("psi", subject, value, p, alpha, p < alpha,
                       {"level": level, "bins": bins, "reference_rows": n, "current_rows": m, **extra})


def psi(reference: Any, current: Any, subject: str = "value", bins: int = 10, alpha: float = 0.01) -> DriftResult:
    """PSI of a numeric variable over the reference's quantile bins (ties merge bins)."""
    ref, cur = _finite(reference, f"psi({subject}).reference"), _finite(current, f"psi({subject}).current")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1))[1:-1])
    table = np.stack([np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1),
                      np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1)])
    return _psi_result(subject, table, alpha, {})


def psi_categorical(reference: Sequence[Any], current: Sequence[Any], subject: str = "value",
                    alpha: float = 0.01) -> DriftResult:
    """PSI over the categories seen in either window."""
    cats, table = _category_counts(reference, current)
    r, c = table[0] / max(table[0].sum(), 1), table[1] / max(table[1].sum(), 1)
    top = cats[np.argsort(-np.abs(c - r))[:3]].tolist()
    return _psi_result(subject, table, alpha, {"most_changed": top})


def ks(reference: Any, current: Any, subject: str = "value", alpha: float = 0.01) -> DriftResult:
    ref, cur = _finite(reference, f"ks({subject}).reference"), _finite(current, f"ks({subject}).current")
    res = stats.ks_2samp(ref, cur)
    return DriftResult("ks", subject, float(res.statistic), float(res.pvalue), alpha, float(res.pvalue) < alpha,
                       {"reference_median": float(np.median(ref)), "current_median": float(np.median(cur))})


def chi2_categorical(reference: Sequence[Any], current: Sequence[Any], subject: str = "value",
                     alpha: float = 0.01) -> DriftResult:
    cats, table = _category_counts(reference, current)
    if len(cats) < 2:
        return DriftResult("chi2", subject, 0.0, 1.0, alpha, False, {"categories": cats.tolist()})
    stat, p, dof, _ = stats.chi2_contingency(table)
    return DriftResult("chi2", subject, float(stat), float(p), alpha, float(p) < alpha, {"dof": int(dof)})


def _category_counts(reference: Sequence[Any], current: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(categories, 2 x K counts of the reference and current windows)."""
    ref = np.asarray(reference, dtype=object).astype(str)
    cur = np.asarray(current, dtype=object).astype(str)
    cats, inv = np.unique(np.concatenate([ref, cur]), return_inverse=True)
    inv = inv.reshape(-1)
    table = np.stack([np.bincount(inv[: ref.size], minlength=len(cats)), np.bincount(inv[ref.size:], minlength=len(cats))])
    return cats, table


def calibration_ratio(p: Any, y: Any, confidence: float = 0.95) -> dict[str, float]:
    """Observed / predicted clicks of one window, with a Clopper-Pearson interval on the click rate
    divided by the mean prediction."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, observed, expected = int(y.size), int(np.rint(y.sum())), float(p.sum())
    if n == 0 or expected <= 0:
        return {"rows": n, "observed": observed, "expected": expected, "observed_over_predicted": math.nan,
                "low": math.nan, "high": math.nan}
    ci = stats.binomtest(observed, n).proportion_ci(confidence, method="exact")
    scale = n / expected
    return {"rows": n, "observed": observed, "expected": expected, "observed_over_predicted": observed / expected,
            "low": ci.low * scale, "high": ci.high * scale}


def _ratio_change_p(o_ref: float, e_ref: float, o_cur: float, e_cur: float) -> float:
    total = int(np.rint(o_ref + o_cur))
    if total == 0 or e_ref <= 0 or e_cur <= 0:
        return 1.0
    return float(stats.binomtest(int(np.rint(o_cur)), total, e_cur / (e_ref + e_cur)).pvalue)


def calibration_drift(p_ref: Any, y_ref: Any, p_cur: Any, y_cur: Any, subject: str = "model",
                      alpha: float = 0.01) -> DriftResult:
    """Has observed / predicted clicks changed from the reference window? (exact conditional test)"""
    ref, cur = calibration_ratio(p_ref, y_ref), calibration_ratio(p_cur, y_cur)
    pv = _ratio_change_p(ref["observed"], ref["expected"], cur["observed"], cur["expected"])
    r0, r1 = ref["observed_over_predicted"], cur["observed_over_predicted"]
    change = r1 / r0 if r0 and r0 > 0 else math.nan
    return DriftResult("calibration_ratio", subject, float(change), pv, alpha, pv < alpha,
                       {"reference": ref, "current": cur})


def segment_calibration_drift(seg_ref: Any, p_ref: Any, y_ref: Any, seg_cur: Any, p_cur: Any, y_cur: Any,
                              subject: str = "segment", alpha: float = 0.01, min_clicks: int = 5) -> DriftResult:
    """Chi-square over segments of the conditional calibration-ratio test (see the module docstring).

    Per segment s: O_cur | O_tot ~ Binomial(O_tot, pi_s), pi_s = E_cur / (E_ref + E_cur) under no drift;
    X = sum_s (O_cur - O_tot pi_s)^2 / (O_tot pi_s (1 - pi_s)) ~ chi2(S). Segments with fewer than
    `min_clicks` clicks in both windows together are pooled into one. `details["segments"]` lists
    each segment's ratio change and its own p-value, worst first.
    """
    keys_r, keys_c = np.asarray(seg_ref, dtype=object).astype(str), np.asarray(seg_cur, dtype=object).astype(str)
    keys = np.union1d(keys_r, keys_c)
    ir, ic = np.searchsorted(keys, keys_r), np.searchsorted(keys, keys_c)
    k = len(keys)
    o_r = np.bincount(ir, np.asarray(y_ref, dtype=np.float64), k)
    e_r = np.bincount(ir, np.asarray(p_ref, dtype=np.float64), k)
    o_c = np.bincount(ic, np.asarray(y_cur, dtype=np.float64), k)
    e_c = np.bincount(ic, np.asarray(p_cur, dtype=np.float64), k)
    both = (e_r > 0) & (e_c > 0)
    small = both & (o_r + o_c < min_clicks)
    big = both & ~small
    groups = [(str(keys[i]), o_r[i], e_r[i], o_c[i], e_c[i]) for i in np.flatnonzero(big)]
    if small.any():
        groups.append((f"<pooled {int(small.sum())} segments>", o_r[small].sum(), e_r[small].sum(),
                       o_c[small].sum(), e_c[small].sum()))
    stat, dof, rows = 0.0, 0, []
    for name, orf, erf, ocu, ecu in groups:
        tot = orf + ocu
        pi = ecu / (erf + ecu)
        if tot <= 0 or not 0 < pi < 1:
            continue
        stat += (ocu - tot * pi) ** 2 / (tot * pi * (1 - pi))
        dof += 1
        change = (ocu / ecu) / (orf / erf) if orf > 0 else math.inf
        rows.append({"segment": name, "ratio_change": change, "reference_clicks": int(orf), "current_clicks": int(ocu),
                     "p_value": _ratio_change_p(orf, erf, ocu, ecu)})
    pv = float(stats.chi2.sf(stat, dof)) if dof else 1.0
    rows.sort(key=lambda r: r["p_value"])
    return DriftResult("segment_calibration", subject, float(stat), pv, alpha, pv < alpha,
                       {"segments_tested": dof, "unseen_in_one_window": int((~both).sum()), "segments": rows[:10]})


@dataclasses.dataclass
class PageHinkley:
    """Page-Hinkley test for an increase in a stream's mean (see the module docstring).

    delta: tolerated increase, in reference standard deviations. alpha: false-alarm probability
    over the stream seen so far, which sets the threshold lambda (it grows like log of the stream's
    length, so a longer quiet stream does not raise more false alarms).
    """

    delta: float = 0.05
    alpha: float = 0.01
    # the reference mean is estimated: centre the walk at its upper z-bound, so an unlucky
    # reference does not turn the no-change drift positive
    z_reference: float = 2.0

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ValueError(f"PageHinkley.delta: must be > 0 (in reference sds), got {self.delta}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"PageHinkley.alpha: must be in (0, 1), got {self.alpha}")

    def threshold(self, reference: np.ndarray, length: int) -> tuple[float, float, float]:
        """(centre, delta, lambda) for a stream of `length` rows, from the reference values."""
        ref = _finite(reference, "PageHinkley.reference")
        sigma = float(ref.std(ddof=1)) if ref.size > 1 else 0.0
        sigma = sigma if sigma > 0 else 1e-12
        centre = float(ref.mean()) + self.z_reference * sigma / math.sqrt(ref.size)
        d = self.delta * sigma
        # R of a walk with drift exactly -d: the centre's margin only guards against reference error
        r = _adjustment_coefficient(ref - ref.mean() - d)
        # Siegmund's approximation of the run length to a false alarm, ARL0 = (e^u - 1 - u) / (R d),
        # u = R lambda; a stream of `length` rows raises one with probability about length / ARL0.
        target = max(length, 1) * r * d / self.alpha
        u = float(optimize.brentq(lambda v: math.expm1(v) - v - target, 1e-12, 2.0 * math.log1p(target) + 10.0))
        return centre, d, u / r

    def run(self, reference: Any, stream: Any, subject: str = "loss") -> DriftResult:
        x = np.asarray(stream, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        centre, d, lam = self.threshold(np.asarray(reference, dtype=np.float64), x.size)
        if x.size == 0:
            return DriftResult("page_hinkley", subject, 0.0, None, lam, False, {"rows": 0})
        m = np.cumsum(x - centre - d)
        ph = m - np.minimum.accumulate(np.minimum(m, 0.0))
        over = np.flatnonzero(ph > lam)
        first = int(over[0]) if over.size else None
        return DriftResult("page_hinkley", subject, float(ph.max()), None, lam, first is not None,
                           {"rows": int(x.size), "alarm_at_row": first, "reference_centre": centre,
                            "current_mean": float(x.mean()), "delta": d})


def _adjustment_coefficient(z: np.ndarray) -> float:
    """R > 0 with mean(exp(R z)) = 1 (Lundberg's adjustment coefficient of a walk with increments z),
    from the empirical distribution; 2 |mean| / var (the Gaussian value) when z is never positive."""
    gaussian = 2.0 * abs(float(z.mean())) / max(float(z.var()), 1e-24)
    if z.max() <= 0:
        return gaussian

    def f(r: float) -> float:
        a = r * z
        top = a.max()
        return top + math.log(np.mean(np.exp(a - top)))  # log mean exp(r z)

    hi = gaussian
    while f(hi) <= 0:
        hi *= 2.0
    return float(optimize.brentq(f, hi * 1e-6, hi))


__all__ = ["PSI_MAJOR", "PSI_MODERATE", "DriftResult", "PageHinkley", "calibration_drift", "calibration_ratio",
           "chi2_categorical", "ks", "psi", "psi_categorical", "segment_calibration_drift"]
