"""AnomalyDetector: anomalies in ad-performance series, with direction, severity and root cause.

Data: a frame with a time column, series columns (default ``account_id``: one series per account),
segment columns (campaign, region, device, ...) and metric columns. Rows are aggregated to one row
per series and period: counts add up, a ratio (ctr, cvr, cpc, cpm, ...) is recomputed from its summed
parts when they are present (``within.monitoring.rootcause.RATIOS``), any other metric is averaged.

Scores, per series (every score of a row uses only earlier rows: the stored baseline from
``fit``/``update_baseline`` and the earlier rows of the frame being scored):

* ``stl_robust_z``: each dimension's causal robust z (``within.monitoring.baseline.RobustBaseline``):
  seasonal adjustment (same-phase median profile or STL; weekly for daily data, daily for finer data),
  optional smoothing, then ``(r - median) / (1.4826 MAD)`` over the last ``baseline_window`` periods of
  the series' own history. A row's score is its largest ``|z|`` over the dimensions.
* ``isolation_forest`` | ``ecod`` | ``copod`` (PyOD): the multivariate detector is fitted on the
  baseline window's feature rows and scores the following rows (refitted every ``refit_every``
  periods, default a tenth of the window). Features are the dimensions' robust z's
  (``features="residuals"``: seasonally adjusted and standardised, so PyOD sees the joint shape) or their raw values and first differences
  (``features="values"``). The PyOD score becomes a z against the scores of its own training rows.
* ``ensemble``: the weighted mean of the methods in ``ensemble_weights`` (default stl_robust_z and
  ecod, equal weights) on the z scale.

Threshold: a row alarms when its z reaches ``z* = Phi^-1(1 - alpha / 2)`` with
``alpha = 10 ** (-60 * (1 - sensitivity))``: higher sensitivity flags more (0.95 -> alpha 1e-3, z* 3.29;
0.9 -> z* 4.89; 0.98 -> z* 1.86). ``score`` in [0, 1] is ``1 - 2 Phi(-|z|)``. Alarming rows within
``merge_gap`` periods of each other form one anomaly (one record per series and episode);
``cooldown`` periods after an anomaly starts fold new alarms into it.

Each anomaly record: ``id, series (dict), subject, start, end, peak, dimension`` (the one with the
largest |z|), ``direction`` (positive | negative), ``kind`` (spike | drop for episodes of at most
``spike_periods`` periods, else level_shift when the deviation is at full size in its first quarter,
else drift), ``score, z, severity`` (critical at |z| >= 2 z*, warning >= 1.25 z*, else info),
``observed, expected`` (the dimension at the peak) and ``dimensions`` (peak z of every dimension that
alarmed). ``explain_anomaly(id)`` drills the anomaly down the segment columns
(``within.monitoring.rootcause``). With an ``alerts`` router each anomaly is emitted as one ``Alert``.

Persistence (``save``/``load``, via BaseMLModel): the settings as JSON and the baseline rows as
arrays in safetensors (strings as integer codes with their vocabulary in the JSON). PyOD models are
not saved (they cannot be without pickle): they are refitted from the baseline rows when scoring,
which is what the rolling scheme does anyway. Detected anomalies are results, not state: they are
not saved.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from within.models.base import BaseMLModel, register_model
from within.monitoring import rootcause
from within.monitoring.alerts import Alert, AlertRouter
from within.monitoring.baseline import SEASONAL, RobustBaseline, alarm_onsets, seasonal_period

log = logging.getLogger(__name__)

METHODS = ("isolation_forest", "ecod", "copod", "stl_robust_z", "ensemble")
PYOD_METHODS = ("isolation_forest", "ecod", "copod")
COUNT_COLUMNS = ("impressions", "clicks", "conversions", "spend", "revenue")
FEATURES = ("residuals", "values")
DEFAULT_ENSEMBLE = {"stl_robust_z": 0.5, "ecod": 0.5}
_TIME_KEY = "__time__"
_SERIES_KEY = "__series__"


def z_threshold(sensitivity: float) -> float:
    """|z| at which a row alarms: Phi^-1(1 - alpha/2), alpha = 10^(-60 (1 - sensitivity))."""
    log_alpha = -60.0 * (1.0 - sensitivity) * math.log(10.0)
    return float(norm.isf(math.exp(log_alpha) / 2.0))


def sensitivity_for(z: float) -> float:
    """Inverse of `z_threshold`: the sensitivity whose threshold is `z`."""
    log10_alpha = (norm.logsf(z) + math.log(2.0)) / math.log(10.0)
    return float(1.0 + log10_alpha / 60.0)


def score_of(z: np.ndarray | float) -> np.ndarray:
    """Anomaly score in [0, 1] of a robust z: 1 - 2 Phi(-|z|)."""
    return 1.0 - 2.0 * norm.sf(np.abs(np.asarray(z, dtype=np.float64)))


def _pyod_model(method: str, n_estimators: int, random_state: int):
    if method == "isolation_forest":
        from pyod.models.iforest import IForest

        return IForest(n_estimators=n_estimators, random_state=random_state)
    if method == "ecod":
        from pyod.models.ecod import ECOD

        return ECOD()
    from pyod.models.copod import COPOD

    return COPOD()


@register_model
class AnomalyDetector(BaseMLModel):
    """Anomalies in performance series, per series, with root-cause drill-down (module docstring)."""

    task = "anomaly"

    def __init__(
        self,
        detection_method: str = "stl_robust_z",
        sensitivity: float = 0.95,
        dimensions: Sequence[str] | None = None,
        baseline_window: int = 28,
        *,
        time_column: str = "timestamp",
        series_columns: Sequence[str] = ("account_id",),
        segment_columns: Sequence[str] | None = None,
        season: str | int = "auto",
        seasonal: str = "profile",
        seasonal_cycles: int = 4,
        smoothing: int = 1,
        min_history: int | None = None,
        refresh: int = 1,
        merge_gap: int = 1,
        cooldown: int = 0,
        spike_periods: int = 3,
        features: str = "residuals",
        ensemble_weights: Mapping[str, float] | None = None,
        refit_every: int | None = None,
        n_estimators: int = 100,
        random_state: int = 0,
        alerts: AlertRouter | None = None,
        model_name: str = "anomaly_detector",
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model_name=model_name, feature_names=list(dimensions) if dimensions else None,
                         model_version=model_version, metadata=metadata)
        self.detection_method = detection_method
        self.sensitivity = sensitivity
        self.dimensions = list(dimensions) if dimensions is not None else None
        self.baseline_window = baseline_window
        self.time_column = time_column
        self.series_columns = list(series_columns)
        self.segment_columns = list(segment_columns) if segment_columns is not None else None
        self.season = season
        self.seasonal = seasonal
        self.seasonal_cycles = seasonal_cycles
        self.smoothing = smoothing
        self.min_history = min_history
        self.refresh = refresh
        self.merge_gap = merge_gap
        self.cooldown = cooldown
        self.spike_periods = spike_periods
        self.features = features
        self.ensemble_weights = dict(ensemble_weights) if ensemble_weights is not None else dict(DEFAULT_ENSEMBLE)
        self.refit_every = refit_every
        self.n_estimators = n_estimators
        self.random_state = random_state
        self.alerts = alerts
        self._check_settings()
        self.baseline_: pd.DataFrame | None = None
        self.anomalies_: dict[str, dict[str, Any]] = {}
        self._context: dict[str, dict[str, Any]] = {}
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------ settings
    def _check_settings(self) -> None:
        name = type(self).__name__
        if self.detection_method not in METHODS:
            raise ValueError(f"{name}.detection_method: must be one of {list(METHODS)}, got {self.detection_method!r}")
        s = self.sensitivity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
            raise ValueError(f"{name}.sensitivity: must be in (0, 1) (higher flags more), got {s!r}")
        for key in ("baseline_window", "seasonal_cycles", "smoothing", "refresh", "spike_periods", "n_estimators"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}.{key}: must be an integer >= 1, got {v!r}")
        for key in ("merge_gap", "cooldown"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name}.{key}: must be an integer >= 0, got {v!r}")
        if self.min_history is not None and (not isinstance(self.min_history, (int, np.integer)) or self.min_history < 3):
            raise ValueError(f"{name}.min_history: must be an integer >= 3 or None, got {self.min_history!r}")
        if self.refit_every is not None and (not isinstance(self.refit_every, (int, np.integer)) or self.refit_every < 1):
            raise ValueError(f"{name}.refit_every: must be an integer >= 1 or None, got {self.refit_every!r}")
        if not (self.season in ("auto", "none") or (isinstance(self.season, (int, np.integer))
                                                   and not isinstance(self.season, bool) and self.season >= 0)):
            raise ValueError(f"{name}.season: must be 'auto', 'none' or a period in rows >= 0, got {self.season!r}")
        if self.seasonal not in SEASONAL:
            raise ValueError(f"{name}.seasonal: must be one of {list(SEASONAL)}, got {self.seasonal!r}")
        if self.features not in FEATURES:
            raise ValueError(f"{name}.features: must be one of {list(FEATURES)}, got {self.features!r}")
        if self.dimensions is not None and not self.dimensions:
            raise ValueError(f"{name}.dimensions: must name at least one metric column (or be None for all)")
        bad = [m for m in self.ensemble_weights if m not in METHODS or m == "ensemble"]
        if bad:
            raise ValueError(f"{name}.ensemble_weights: {bad} are not methods; use any of {list(METHODS[:-1])}")
        if not self.ensemble_weights or any(w < 0 for w in self.ensemble_weights.values()) \
                or sum(self.ensemble_weights.values()) <= 0:
            raise ValueError(f"{name}.ensemble_weights: need weights >= 0 with a positive sum, got {self.ensemble_weights}")

    @property
    def threshold(self) -> float:
        """|z| at which a row alarms (from `sensitivity`)."""
        return z_threshold(self.sensitivity)

    def get_params(self) -> dict[str, Any]:
        keys = ("detection_method", "sensitivity", "dimensions", "baseline_window", "time_column", "series_columns",
                "segment_columns", "season", "seasonal", "seasonal_cycles", "smoothing", "min_history", "refresh",
                "merge_gap", "cooldown", "spike_periods", "features", "ensemble_weights", "refit_every",
                "n_estimators", "random_state")
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------ data
    def _prepare(self, data: pd.DataFrame | Mapping | Sequence[Mapping], what: str) -> pd.DataFrame:
        name = type(self).__name__
        if isinstance(data, Mapping):
            data = pd.DataFrame([data])
        elif isinstance(data, pd.Series):
            data = data.to_frame().T
        elif not isinstance(data, pd.DataFrame):
            data = pd.DataFrame(list(data))
        if self.time_column not in data:
            raise ValueError(f"{name}.time_column: column {self.time_column!r} is not in the {what} "
                             f"(columns: {list(data.columns)}); set time_column=...")
        missing = [c for c in self.series_columns if c not in data]
        if missing:
            raise ValueError(f"{name}.series_columns: {missing} are not in the {what} (columns: {list(data.columns)}); "
                             f"pass series_columns=[] to treat it as one series")
        frame = data.copy()
        try:
            frame[self.time_column] = pd.to_datetime(frame[self.time_column])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}.time_column: {self.time_column!r} does not parse as timestamps ({err})") from None
        for col in self.series_columns:
            frame[col] = frame[col].astype(str)
        dims = self._dimensions(frame, what)
        for dim in dims:
            if dim in frame:
                frame[dim] = pd.to_numeric(frame[dim], errors="coerce")
        return frame

    def _dimensions(self, frame: pd.DataFrame, what: str) -> list[str]:
        if self.dimensions is not None:
            cols = list(frame.columns)
            missing = [d for d in self.dimensions if d not in frame and rootcause.components(d, cols) is None]
            if missing:
                raise ValueError(f"{type(self).__name__}.dimensions: {missing} are neither columns of the {what} "
                                 f"nor ratios of its columns (columns: {list(frame.columns)})")
            return list(self.dimensions)
        skip = {self.time_column, *self.series_columns, *(self.segment_columns or [])}
        dims = [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])
                and not pd.api.types.is_bool_dtype(frame[c])]
        if not dims:
            raise ValueError(f"{type(self).__name__}.dimensions: the {what} has no numeric metric columns; "
                             f"name them with dimensions=[...]")
        return dims

    def _segments(self, frame: pd.DataFrame, dims: Sequence[str]) -> list[str]:
        if self.segment_columns is not None:
            missing = [c for c in self.segment_columns if c not in frame]
            if missing:
                raise ValueError(f"{type(self).__name__}.segment_columns: {missing} are not in the data "
                                 f"(columns: {list(frame.columns)})")
            return list(self.segment_columns)
        skip = {self.time_column, *self.series_columns, *dims}
        return [c for c in frame.columns if c not in skip and not pd.api.types.is_numeric_dtype(frame[c])]

    def _aggregate(self, frame: pd.DataFrame, dims: Sequence[str]) -> pd.DataFrame:
        """One row per (series, time): counts summed, ratios from summed parts, the rest averaged."""
        keys = [*self.series_columns, self.time_column]
        cols = list(frame.columns)
        summed, averaged = set(), set()
        for d in dims:
            parts = rootcause.components(d, cols)
            if parts:
                summed |= {parts[0], parts[1]}
            elif d in COUNT_COLUMNS:
                summed.add(d)
            else:
                averaged.add(d)
        how = {c: ("sum" if c in summed else "mean") for c in cols if c in summed | averaged}
        agg = frame.groupby(keys, sort=True, observed=True).agg(how).reset_index()
        for d in dims:
            parts = rootcause.components(d, list(frame.columns))
            if parts:
                num, den, scale = parts
                agg[d] = np.where(agg[den] > 0, scale * agg[num] / agg[den].where(agg[den] > 0, 1.0), 0.0)
        agg[_SERIES_KEY] = self._series_ids(agg)
        return agg

    def _series_ids(self, frame: pd.DataFrame) -> pd.Series:
        if not self.series_columns:
            return pd.Series("all", index=frame.index)
        parts = [frame[c].astype(str) for c in self.series_columns]
        out = parts[0].radd(f"{self.series_columns[0]}=")
        for col, p in zip(self.series_columns[1:], parts[1:]):
            out = out + f",{col}=" + p
        return out

    def _with_history(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
        """History rows (the baseline before each series' first new time) + `frame`; mask of new rows."""
        if self.baseline_ is None or self.baseline_.empty:
            return frame, pd.Series(True, index=frame.index)
        hist = self.baseline_
        new_ids = self._series_ids(frame)
        first = frame.groupby(new_ids)[self.time_column].min()
        hist_ids = self._series_ids(hist)
        keep = hist[self.time_column].to_numpy() < hist_ids.map(first).fillna(pd.Timestamp.max).to_numpy()
        hist = hist[keep]
        both = pd.concat([hist, frame], ignore_index=True)
        is_new = pd.Series(np.r_[np.zeros(len(hist), bool), np.ones(len(frame), bool)])
        return both, is_new

    # ------------------------------------------------------------------ scoring
    def _baseline(self, times: pd.Series) -> RobustBaseline:
        if self.season == "auto":
            period = seasonal_period(times, min(len(times), self.baseline_window))
        elif self.season == "none":
            period = 0
        else:
            period = int(self.season)
        return RobustBaseline(window=int(self.baseline_window), period=period, cycles=int(self.seasonal_cycles),
                              smoothing=int(self.smoothing), min_history=self.min_history,
                              refresh=int(self.refresh), seasonal=self.seasonal)

    def score_series(self, values: pd.DataFrame, times: pd.Series) -> dict[str, np.ndarray]:
        """Scores of one aggregated series (rows in time order; `values` has one column per dimension):
        'z' (combined, >= 0), 'z_<dim>' (signed robust z), 'expected_<dim>', and the method's parts."""
        b = self._baseline(times)
        out: dict[str, np.ndarray] = {}
        zs = []
        for dim in values.columns:
            res = b.score(values[dim].to_numpy(dtype=np.float64))
            out[f"z_{dim}"], out[f"expected_{dim}"] = res.z, res.expected
            zs.append(res.z)
        zmat = np.stack(zs, axis=1) if zs else np.zeros((len(values), 0))
        stl = np.abs(zmat).max(axis=1) if zmat.shape[1] else np.zeros(len(values))
        methods = (list(self.ensemble_weights) if self.detection_method == "ensemble" else [self.detection_method])
        parts = {}
        for m in methods:
            parts[m] = stl if m == "stl_robust_z" else self._pyod_z(m, values, zmat, b.history_needed)
            out[f"method_{m}"] = parts[m]
        if self.detection_method == "ensemble":
            total = sum(self.ensemble_weights[m] for m in methods)
            out["z"] = sum(self.ensemble_weights[m] * parts[m] for m in methods) / total
        else:
            out["z"] = parts[self.detection_method]
        return out

    def _pyod_z(self, method: str, values: pd.DataFrame, zmat: np.ndarray, first: int) -> np.ndarray:
        """Rolling PyOD: fit on the baseline rows before each refit point, score until the next one."""
        if self.features == "residuals":
            feats = zmat
        else:
            v = values.to_numpy(dtype=np.float64)
            feats = np.concatenate([v, np.vstack([np.zeros((1, v.shape[1])), np.diff(v, axis=0)])], axis=1)
        feats = np.nan_to_num(feats)
        n, w = len(feats), int(self.baseline_window)
        every = self.refit_every or max(1, w // 10)
        out = np.zeros(n)
        for t0 in range(max(first, 8), n, every):
            train = feats[max(first, t0 - w):t0] if self.features == "residuals" else feats[max(0, t0 - w):t0]
            if len(train) < 8:
                continue
            model = _pyod_model(method, int(self.n_estimators), int(self.random_state))
            model.fit(train)
            ref = np.asarray(model.decision_scores_, dtype=np.float64)
            med = np.median(ref)
            mad = np.median(np.abs(ref - med)) * 1.4826 or np.mean(np.abs(ref - med)) * 1.2533 or 1e-12
            now = np.asarray(model.decision_function(feats[t0:t0 + every]), dtype=np.float64)
            out[t0:t0 + every] = np.maximum((now - med) / mad, 0.0)
        return out

    def _score_frame(self, data: Any, what: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        frame = self._prepare(data, what)
        dims = self._dimensions(frame, what)
        both, is_new = self._with_history(frame)
        both = both.assign(__new__=is_new.to_numpy())
        agg = self._aggregate(both, dims)
        new_keys = both.loc[both["__new__"], [*self.series_columns, self.time_column]].drop_duplicates()
        agg = agg.merge(new_keys.assign(__new__=True), on=[*self.series_columns, self.time_column], how="left")
        agg["__new__"] = agg["__new__"].fillna(False).astype(bool)
        pieces = []
        for _, g in agg.groupby(_SERIES_KEY, sort=True):
            g = g.sort_values(self.time_column, kind="stable")
            scores = self.score_series(g[dims], g[self.time_column])
            pieces.append(g.assign(**scores))
        scored = pd.concat(pieces, ignore_index=True) if pieces else agg
        return scored, both, dims

    # ------------------------------------------------------------------ public API
    def fit(self, X: Any, y: Any = None) -> AnomalyDetector:
        """Make `X` the baseline history (replacing any earlier one); labels are not used."""
        frame = self._prepare(X, "baseline data")
        self.dimensions = self.dimensions or self._dimensions(frame, "baseline data")
        self.feature_names = list(self.dimensions)
        self.baseline_ = frame.reset_index(drop=True)
        return self

    def update_baseline(self, new_data: Any) -> AnomalyDetector:
        """Append `new_data` to the baseline history (rows at already-stored times replace those)."""
        frame = self._prepare(new_data, "new data")
        if self.baseline_ is None:
            return self.fit(frame)
        keys = [*self.series_columns, self.time_column,
                *self._segments(frame, self.dimensions or self._dimensions(frame, "new data"))]
        both = pd.concat([self.baseline_, frame], ignore_index=True)
        self.baseline_ = both.drop_duplicates(subset=keys, keep="last").sort_values(
            [*self.series_columns, self.time_column], kind="stable").reset_index(drop=True)
        return self

    def aggregate(self, data: Any) -> pd.DataFrame:
        """`data` as one row per series and period with every dimension (ratios from summed parts)."""
        frame = self._prepare(data, "data")
        return self._aggregate(frame, self._dimensions(frame, "data")).drop(columns=[_SERIES_KEY])

    def predict(self, X: Any) -> np.ndarray:
        """Anomaly score in [0, 1] of each row of X (its series' score at its time)."""
        scored, _, _ = self._score_frame(X, "data")
        frame = self._prepare(X, "data")
        key = pd.MultiIndex.from_frame(scored[[*self.series_columns, self.time_column]])
        lookup = pd.Series(score_of(scored["z"].to_numpy()), index=key)
        rows = pd.MultiIndex.from_frame(frame[[*self.series_columns, self.time_column]])
        return lookup.reindex(rows).to_numpy(dtype=np.float64)

    def get_anomaly_score(self, data_point: Any) -> float:
        """Score in [0, 1] of one period of one series (a dict, Series or rows of one time), against
        the baseline history."""
        frame = self._prepare(data_point, "data point")
        if frame[self.time_column].nunique() != 1 or (self.series_columns and
                                                     self._series_ids(frame).nunique() != 1):
            raise ValueError(f"{type(self).__name__}.get_anomaly_score: data_point must hold one time of one "
                             f"series; got {frame[self.time_column].nunique()} times")
        scored, _, _ = self._score_frame(frame, "data point")
        row = scored[scored["__new__"]]
        return float(score_of(row["z"].to_numpy())[-1])

    def alarms(self, z: np.ndarray) -> np.ndarray:
        """Alarm onsets of a combined z series: rows where z reaches the threshold, one per `cooldown`."""
        return alarm_onsets(z, self.threshold, int(self.cooldown))

    def detect_anomalies(self, performance_data: Any) -> list[dict[str, Any]]:
        """Anomalies in `performance_data` (scored against the baseline and its own earlier rows)."""
        scored, rows, dims = self._score_frame(performance_data, "performance_data")
        segs = self._segments(rows, dims)
        found = []
        zstar = self.threshold
        for sid, g in scored.groupby(_SERIES_KEY, sort=True):
            g = g.sort_values(self.time_column, kind="stable").reset_index(drop=True)
            hot = (g["z"].to_numpy() >= zstar) & g["__new__"].to_numpy()
            for lo, hi in self._episodes(np.flatnonzero(hot)):
                rec = self._record(sid, g, lo, hi, dims, zstar)
                found.append(rec)
                self.anomalies_[rec["id"]] = rec
                self._context[rec["id"]] = {"rows": rows, "series": g, "lo": lo, "hi": hi, "segments": segs}
        for rec in found:
            if self.alerts is not None:
                self.alerts.emit(self._alert(rec))
        return found

    def _episodes(self, idx: np.ndarray) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for i in idx:
            if out and (i - out[-1][1] <= self.merge_gap + 1 or i - out[-1][0] <= self.cooldown):
                out[-1] = (out[-1][0], int(i))
            else:
                out.append((int(i), int(i)))
        return out

    def _record(self, sid: str, g: pd.DataFrame, lo: int, hi: int, dims: list[str], zstar: float) -> dict:
        seg = g.iloc[lo:hi + 1]
        zc = seg["z"].to_numpy()
        peak = lo + int(np.argmax(zc))
        zd = {d: seg[f"z_{d}"].to_numpy() for d in dims}
        peak_z = {d: float(v[np.argmax(np.abs(v))]) for d, v in zd.items()}
        dim = max(dims, key=lambda d: abs(peak_z[d]))
        zdim = zd[dim]
        sign = 1.0 if peak_z[dim] >= 0 else -1.0
        length = hi - lo + 1
        if length <= self.spike_periods:
            kind = "spike" if sign > 0 else "drop"
        else:
            q = max(1, length // 4)
            kind = "level_shift" if np.abs(zdim[:q]).max() >= 0.6 * np.abs(zdim).max() else "drift"
        top = float(zc.max())
        severity = "critical" if top >= 2 * zstar else "warning" if top >= 1.25 * zstar else "info"
        series = {c: g.iloc[0][c] for c in self.series_columns}
        pk = g.iloc[peak]
        return {
            "id": f"anomaly-{next(self._counter):04d}",
            "series": series,
            "subject": sid,
            "start": g.iloc[lo][self.time_column],
            "end": g.iloc[hi][self.time_column],
            "peak": pk[self.time_column],
            "dimension": dim,
            "direction": "positive" if sign > 0 else "negative",
            "kind": kind,
            "score": float(score_of(top)),
            "z": float(peak_z[dim]),
            "severity": severity,
            "observed": float(pk[dim]),
            "expected": float(pk[f"expected_{dim}"]) if np.isfinite(pk[f"expected_{dim}"]) else None,
            "dimensions": {d: round(v, 3) for d, v in peak_z.items() if abs(v) >= zstar},
            "method": self.detection_method,
        }

    def _alert(self, rec: dict) -> Alert:
        details = {k: (v.isoformat() if isinstance(v, pd.Timestamp) else v) for k, v in rec.items()
                   if k in ("id", "start", "end", "peak", "dimension", "direction", "score", "z", "observed",
                            "expected", "dimensions", "method")}
        msg = (f"{rec['dimension']} {rec['kind'].replace('_', ' ')} ({rec['direction']}, z={rec['z']:.1f}) "
               f"for {rec['subject']} from {rec['start']} to {rec['end']}")
        return Alert(source="anomaly_detector", kind=rec["kind"], subject=rec["subject"],
                     severity=rec["severity"], message=msg, details=details)

    def explain_anomaly(self, anomaly_id: str) -> dict[str, Any]:
        """Which dimensions and which segments drove anomaly `anomaly_id`, with their contributions."""
        if anomaly_id not in self.anomalies_:
            known = list(self.anomalies_)[-5:]
            raise KeyError(f"{type(self).__name__}.explain_anomaly: no anomaly {anomaly_id!r}; "
                           f"run detect_anomalies first (latest ids: {known})")
        rec, ctx = self.anomalies_[anomaly_id], self._context[anomaly_id]
        g, lo, hi, rows = ctx["series"], ctx["lo"], ctx["hi"], ctx["rows"]
        dims = [d for d in (self.dimensions or []) if f"z_{d}" in g] or [rec["dimension"]]
        window = g.iloc[lo:hi + 1]
        per_dim = []
        for d in dims:
            exp = window[f"expected_{d}"].to_numpy(dtype=np.float64)
            obs = window[d].to_numpy(dtype=np.float64)
            ok = np.isfinite(exp)
            per_dim.append({
                "dimension": d, "z": float(window[f"z_{d}"].abs().max() * np.sign(window[f"z_{d}"].iloc[
                    int(np.argmax(window[f"z_{d}"].abs().to_numpy()))])),
                "observed": float(obs[ok].mean()) if ok.any() else float("nan"),
                "expected": float(exp[ok].mean()) if ok.any() else float("nan"),
            })
            e = per_dim[-1]
            e["relative_change"] = (e["observed"] - e["expected"]) / e["expected"] if e["expected"] else float("nan")
        per_dim.sort(key=lambda e: -abs(e["z"]))
        out = {"id": anomaly_id, "subject": rec["subject"], "start": rec["start"], "end": rec["end"],
               "kind": rec["kind"], "direction": rec["direction"], "dimensions": per_dim,
               "root_cause": {}, "segments": {}}
        segs = ctx["segments"]
        if segs:
            drill = self._drill(rec, g, lo, hi, rows, segs)
            out.update(root_cause=drill["root_cause"], segments=drill["segments"], metric=drill["metric"])
        cause = ", ".join(f"{k}={v}" for k, v in out["root_cause"].items()) or "the whole series"
        out["summary"] = (f"{rec['dimension']} {rec['direction']} {rec['kind'].replace('_', ' ')} for {rec['subject']}"
                          f" ({rec['start']} .. {rec['end']}); concentrated in {cause}")
        return out

    def _drill(self, rec: dict, g: pd.DataFrame, lo: int, hi: int, rows: pd.DataFrame, segs: list[str]) -> dict:
        """Root cause from the segment rows: the anomaly's rows against the baseline rows before it."""
        mask = np.ones(len(rows), dtype=bool)
        for c, v in rec["series"].items():
            mask &= (rows[c].astype(str) == str(v)).to_numpy()
        times = g[self.time_column]
        period = self._baseline(times).period
        position = pd.Series(np.arange(len(g)) % max(period, 1), index=times.to_numpy())
        series_rows = rows[mask]
        series_rows = series_rows.assign(__phase__=position.reindex(series_rows[self.time_column].to_numpy()).to_numpy())
        t = series_rows[self.time_column]
        start, end = times.iloc[lo], times.iloc[hi]
        base_start = times.iloc[max(0, lo - int(self.baseline_window))]
        window = series_rows[(t >= start) & (t <= end)]
        baseline = series_rows[(t >= base_start) & (t < start)]
        direction = 1.0 if rec["direction"] == "positive" else -1.0
        return rootcause.explain(window, baseline, segs, rec["dimension"], direction, self.time_column,
                                 phase="__phase__" if period >= 2 else None)

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        columns: list[dict[str, Any]] = []
        base = self.baseline_ if self.baseline_ is not None else pd.DataFrame()
        for i, col in enumerate(base.columns):
            s = base[col]
            if col == self.time_column:
                arrays[f"col{i}"] = s.to_numpy(dtype="datetime64[ns]").astype(np.int64)
                columns.append({"name": col, "kind": "time"})
            elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                arrays[f"col{i}"] = s.to_numpy(dtype=np.float64)
                columns.append({"name": col, "kind": "number"})
            else:
                codes, vocab = pd.factorize(s.astype(str))
                arrays[f"col{i}"] = codes.astype(np.int32)
                columns.append({"name": col, "kind": "string", "vocab": [str(v) for v in vocab]})
        if not arrays:
            arrays["empty"] = np.zeros(0, dtype=np.float64)
        return arrays, {"params": self.get_params(), "columns": columns, "fitted": self.baseline_ is not None}

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> AnomalyDetector:
        model = cls(**config["params"])
        if config.get("fitted"):
            data = {}
            for i, spec in enumerate(config["columns"]):
                a = arrays[f"col{i}"]
                if spec["kind"] == "time":
                    data[spec["name"]] = pd.to_datetime(a.astype("datetime64[ns]"))
                elif spec["kind"] == "number":
                    data[spec["name"]] = a
                else:
                    data[spec["name"]] = np.asarray(spec["vocab"], dtype=object)[a]
            model.baseline_ = pd.DataFrame(data)
        return model


__all__ = ["METHODS", "AnomalyDetector", "score_of", "sensitivity_for", "z_threshold"]
