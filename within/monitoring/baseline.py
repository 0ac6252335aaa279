"""Causal robust baselines for one series: seasonal adjustment, then a robust z from its own history.

For row ``t`` of a series ``x`` the baseline is the ``window`` rows before it, ``B_t = x[t-window : t]``
(never ``t`` itself or later rows, so a score is what a streaming detector would have said at ``t``):

1. Seasonal reference ``ref_t`` (``period`` rows per cycle, 0 = none):
   * ``seasonal="profile"``: the median of ``x`` at the same phase in the last ``cycles`` cycles,
     ``median(x[t - j*period] for j = 1..cycles)`` (a day-of-week or hour-of-day profile that one
     anomalous cycle cannot move);
   * ``seasonal="stl"``: statsmodels ``STL(robust=True)`` fitted on the last ``cycles + 1`` cycles of
     ``B_t`` (refitted every ``max(refresh, period)`` rows); ``ref_t`` = its last trend value + its
     seasonal value at the same phase of the last fitted cycle.
   Without a period ``ref_t = 0`` (the level is in step 3); before the first full cycle (or the first
   STL fit) there is no reference, and those rows neither score nor enter any baseline.
2. Residual ``r_t = x_t - ref_t``, averaged over the last ``smoothing`` rows (1 = no smoothing): a
   sustained shift then stands out of the noise sooner than any single row.
3. Robust z: ``z_t = (r_t - median(r over B_t)) / scale(r over B_t)`` with ``scale = 1.4826 * MAD``
   (the normal-consistent MAD); when the MAD is 0 (a series that mostly repeats one value) the mean
   absolute deviation times 1.2533 stands in, and when that is 0 too any change scores ``Z_CAP``.
   The statistics are recomputed every ``refresh`` rows from the rows before that point.

``expected_t = ref_t + median(r over B_t)`` is the baseline's value for ``x_t`` (the level of the
seasonally adjusted series, for smoothing 1), and ``scale_t`` its spread. Rows with fewer than
``min_history`` rows of history (default: half the window, at most 50) get z = 0.

Written here rather than taken from a library: statsmodels' STL and pandas' rolling median are
batch tools that look at the whole series; what is needed is the causal, windowed version of them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

Z_CAP = 1e3  # z of a change in a series whose baseline never varies
MAD_TO_SD = 1.4826
MEAN_AD_TO_SD = 1.2533  # sqrt(pi / 2): mean absolute deviation of a normal, in sds
SEASONAL = ("profile", "stl")


def seasonal_period(timestamps: pd.Series | np.ndarray, rows_of_history: int, cycles: int = 2) -> int:
    """Rows per seasonal cycle implied by the sampling step: a week of days for daily (or coarser)
    data, a day of rows for finer data; 0 when the history holds fewer than `cycles` cycles."""
    ts = pd.to_datetime(pd.Series(timestamps))
    if len(ts) < 3:
        return 0
    step = ts.diff().dropna()
    step = step[step > pd.Timedelta(0)].median()
    if pd.isna(step):
        return 0
    day = pd.Timedelta(days=1)
    period = 7 * max(1, round(day / step)) if step >= day else round(day / step)
    return period if period >= 2 and rows_of_history >= cycles * period else 0


@dataclasses.dataclass(frozen=True)
class BaselineScores:
    z: np.ndarray
    expected: np.ndarray
    scale: np.ndarray


@dataclasses.dataclass(frozen=True)
class RobustBaseline:
    """Causal robust z of one series (see the module docstring)."""

    window: int
    period: int = 0
    cycles: int = 4
    smoothing: int = 1
    min_history: int | None = None
    refresh: int = 1
    seasonal: str = "profile"

    def __post_init__(self) -> None:
        for name in ("window", "cycles", "smoothing", "refresh"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RobustBaseline.{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.period, (int, np.integer)) or self.period < 0:
            raise ValueError(f"RobustBaseline.period: must be an integer >= 0 (0: no seasonality), got {self.period!r}")
        if self.seasonal not in SEASONAL:
            raise ValueError(f"RobustBaseline.seasonal: must be one of {SEASONAL}, got {self.seasonal!r}")

    @property
    def history_needed(self) -> int:
        return max(3, self.min_history if self.min_history is not None else min(self.window // 2, 50))

    def reference(self, x: np.ndarray) -> np.ndarray:
        """Seasonal reference ref_t from rows before t: 0 without a period, NaN before the first cycle."""
        n, p = len(x), int(self.period)
        if p < 2:
            return np.zeros(n)
        if n <= p:
            return np.full(n, np.nan)
        if self.seasonal == "stl":
            return self._stl_reference(x)
        lags = np.full((self.cycles, n), np.nan)
        for j in range(1, self.cycles + 1):
            if j * p < n:
                lags[j - 1, j * p:] = x[:n - j * p]
        ref = np.full(n, np.nan)
        have = ~np.isnan(lags).all(axis=0)
        ref[have] = np.nanmedian(lags[:, have], axis=0)
        return ref

    def _stl_reference(self, x: np.ndarray) -> np.ndarray:
        from statsmodels.tsa.seasonal import STL

        n, p = len(x), int(self.period)
        ref = np.full(n, np.nan)
        step = max(self.refresh, p)  # refit at most once per cycle
        span = min(self.window, (max(self.cycles, 2) + 1) * p)  # STL sees the last cycles + 1 cycles
        start = max(2 * p + 1, self.history_needed)
        for t0 in range(start, n, step):
            hist = x[max(0, t0 - span):t0]
            if len(hist) < 2 * p + 1:
                continue
            fit = STL(hist, period=p, robust=True).fit()
            seasonal, trend = np.asarray(fit.seasonal), float(np.asarray(fit.trend)[-1])
            for t in range(t0, min(n, t0 + step)):
                back = t - t0  # seasonal value one (or more) cycles before t, inside the fit
                idx = len(hist) - p + (back % p)
                ref[t] = trend + seasonal[idx]
        return ref

    def score(self, values: np.ndarray) -> BaselineScores:
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"RobustBaseline.score: expected a 1-d series, got shape {x.shape}")
        x = np.where(np.isfinite(x), x, np.nan)
        if np.isnan(x).any():  # a missing value repeats the previous one (0 at the start)
            x = pd.Series(x).ffill().fillna(0.0).to_numpy()
        ref = self.reference(x)
        r = x - ref  # NaN before the seasonal reference exists: those rows neither score nor form baselines
        if self.smoothing > 1:
            r = pd.Series(r).rolling(self.smoothing, min_periods=1).mean().to_numpy()
        valid = np.flatnonzero(np.isfinite(r))
        v0 = int(valid[0]) if len(valid) else len(r)
        med, scale = np.full(len(r), np.nan), np.full(len(r), np.nan)
        med[v0:], scale[v0:] = self._stats(r[v0:])
        z = np.zeros(len(x))
        ok = ~np.isnan(med)
        dev = r - np.where(ok, med, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            zz = np.where(scale > 0, dev / scale, np.where(dev == 0, 0.0, np.sign(dev) * Z_CAP))
        z[ok] = np.clip(zz[ok], -Z_CAP, Z_CAP)
        expected = np.where(ok, np.nan_to_num(ref) + np.where(ok, med, 0.0), np.nan)
        return BaselineScores(z=z, expected=expected, scale=np.where(ok, scale, np.nan))

    def _stats(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Median and robust scale of r over each row's baseline, refreshed every `refresh` rows."""
        n, w, k = len(r), int(self.window), int(self.refresh)
        med, scale = np.full(n, np.nan), np.full(n, np.nan)
        first = self.history_needed
        if n <= first:
            return med, scale
        points = np.arange(first, n, k)
        short = points[points < w]  # windows still growing: each its own slice
        for t in short:
            m, sc = _robust(r[:t][None])
            med[t], scale[t] = m[0], sc[0]
        full = points[points >= w]
        if len(full) and w <= 4096:  # full windows at once, in blocks to bound memory
            view = sliding_window_view(r, w)  # view[t - w] = r[t - w : t]
            block = max(1, 400_000 // w)
            for lo in range(0, len(full), block):
                pts = full[lo:lo + block]
                med[pts], scale[pts] = _robust(view[pts - w])
        else:
            for t in full:
                m, sc = _robust(r[t - w:t][None])
                med[t], scale[t] = m[0], sc[0]
        if k > 1:  # carry each refresh point's statistics to the rows until the next one
            med = pd.Series(med).ffill().to_numpy().copy()
            scale = pd.Series(scale).ffill().to_numpy().copy()
            med[:first], scale[:first] = np.nan, np.nan
        return med, scale


def _robust(win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (median, robust scale) of a 2-d array."""
    m = np.median(win, axis=1)
    dev = np.abs(win - m[:, None])
    mad = np.median(dev, axis=1) * MAD_TO_SD
    mean_ad = dev.mean(axis=1) * MEAN_AD_TO_SD
    return m, np.where(mad > 0, mad, mean_ad)


def alarm_onsets(z: np.ndarray, threshold: float, cooldown: int = 0) -> np.ndarray:
    """Rows where |z| first reaches `threshold`; alarms within `cooldown` rows of the last onset are
    folded into it (a lasting excursion raises one alarm, not one per row)."""
    hot = np.flatnonzero(np.abs(np.asarray(z)) >= threshold)
    out = np.zeros(len(z), dtype=bool)
    last = -math.inf
    for i in hot:
        if i - last > cooldown:
            out[i] = True
            last = i
    return out


__all__ = ["MAD_TO_SD", "SEASONAL", "Z_CAP", "BaselineScores", "RobustBaseline", "alarm_onsets", "seasonal_period"]
