"""PerformanceMonitor: logs predictions (and their outcomes, possibly later), tracks metrics over
windows, tests for drift against a reference window, compares with a baseline model, raises alerts
and writes a report. State lives in SQLite (`within.monitoring.store`), so a restarted process
resumes with the same counts.

Windows: predictions are numbered in arrival order; window k holds predictions k*W+1 .. (k+1)*W
(W = window_size). The first `reference_windows` windows are the reference. `detect_drift()` tests
the latest complete window against it, with every test at level alert_threshold / (number of tests) (Bonferroni), so one
check raises a false alarm with probability at most alert_threshold. The tests
(`within.monitoring.drift`): KS and PSI on each numeric feature and on the scores, PSI on each
categorical feature (PSI's p-value is the chi-square test of its bin counts), the calibration ratio's change (overall and per segment key), a
Page-Hinkley test on the per-row log loss since the reference, and, with a baseline model, a paired
one-sided t-test of the live model's log loss against the baseline's on the same rows.

Serving: `log_prediction(p, request_id=..., features=..., segment=...)` at prediction time and
`log_outcome(request_id, actual)` when the outcome arrives; both are thread-safe and commit before
they return.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from within.calibration import metrics as M
from within.monitoring.alerts import Alert, AlertRouter
from within.monitoring.drift import (
    DriftResult,
    PageHinkley,
    calibration_drift,
    ks,
    psi,
    psi_categorical,
    segment_calibration_drift,
)
from within.monitoring.store import MonitorStore

METRICS = {
    "auc": M.auc, "logloss": M.logloss, "brier": M.brier, "ece": M.ece, "ks": M.ks_error,
    "calib_ratio": M.calibration_ratio,
}
# what a fired test says, for the alert's kind (the router de-duplicates by source + kind + subject)
KINDS = {"ks": "feature_drift", "psi": "feature_drift",
         "calibration_ratio": "calibration_drift", "segment_calibration": "calibration_drift",
         "page_hinkley": "loss_increase", "baseline_gap": "baseline_gap"}
SOURCE = "performance_monitor"


@dataclasses.dataclass
class DriftReport:
    """The outcome of one `detect_drift()` check."""

    window: int | None
    drifted: bool
    alpha: float
    results: list[DriftResult]
    note: str = ""

    @property
    def fired(self) -> list[DriftResult]:
        return [r for r in self.results if r.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "drifted": self.drifted, "alpha": self.alpha, "note": self.note,
                "fired": [f"{r.test}:{r.subject}" for r in self.fired], "results": [r.to_dict() for r in self.results]}


class PerformanceMonitor:
    """Track a binary model's live performance and detect drift (see the module docstring).

    metrics: names from METRICS. window_size: predictions per window. alert_threshold: false-alarm
    probability of one drift check (family-wise). baseline_model: optional object with `.predict(X)`
    (X: a DataFrame of the logged features) scored on the same rows. storage: SQLite path (":memory:"
    keeps nothing). alerts: where fired tests go (default: the log). page_hinkley_delta: the loss
    increase the sequential test tolerates, in reference standard deviations. reference_windows:
    how many windows from the start form the reference (more: less noise in every comparison).
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("auc", "logloss", "calib_ratio", "ece"),
        window_size: int = 5000,
        alert_threshold: float = 0.01,
        baseline_model: Any = None,
        *,
        storage: str | Path = ":memory:",
        alerts: AlertRouter | None = None,
        page_hinkley_delta: float = 0.05,
        reference_windows: int = 1,
    ) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"PerformanceMonitor.metrics: {unknown or list(metrics)} not known; choose from {sorted(METRICS)}")
        if not isinstance(window_size, int) or window_size < 20:
            raise ValueError(f"PerformanceMonitor.window_size: must be an int >= 20 predictions, got {window_size!r}")
        if not 0 < alert_threshold < 1:
            raise ValueError(f"PerformanceMonitor.alert_threshold: must be in (0, 1) (a false-alarm probability), "
                             f"got {alert_threshold!r}")
        if baseline_model is not None and not callable(getattr(baseline_model, "predict", None)):
            raise ValueError(f"PerformanceMonitor.baseline_model: needs a .predict(X) method, got {type(baseline_model).__name__}")
        if not isinstance(reference_windows, int) or reference_windows < 1:
            raise ValueError(f"PerformanceMonitor.reference_windows: must be an int >= 1, got {reference_windows!r}")
        self.reference_windows = reference_windows
        self.metrics = list(metrics)
        self.window_size = window_size
        self.alert_threshold = float(alert_threshold)
        self.baseline_model = baseline_model
        self.alerts = alerts if alerts is not None else AlertRouter()
        self.page_hinkley = PageHinkley(delta=page_hinkley_delta)  # validates delta
        self.store = MonitorStore(storage)
        for key, value in (("window_size", window_size), ("reference_windows", reference_windows)):
            saved = self.store.meta(key)
            if saved is not None and saved != value:
                raise ValueError(f"PerformanceMonitor.{key}: {storage} was written with {key}={saved}; "
                                 f"reopen it with that value, or reset() it first")
            self.store.set_meta(key, value)

    # ------------------------------------------------------------------ logging
    def log_prediction(self, prediction: Any, actual: Any = None, *, features: Any = None, segment: Any = None,
                       request_id: Any = None) -> tuple[int, int]:
        """Log one prediction (a float) or a batch (an array); return the (first, last) sequence numbers.

        actual: the 0/1 outcome, None (or NaN in a batch) when unknown; join it later with
        log_outcome(request_id, actual). features / segment: a dict (one row), or a DataFrame, a
        dict of columns or a list of dicts (a batch); only scalar values are stored (images are not).
        segment keys (e.g. account_id, region) get their own calibration-drift tests.
        """
        single = np.ndim(prediction) == 0
        p = np.atleast_1d(np.asarray(prediction, dtype=np.float64))
        n = p.size
        if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
            bad = int(np.flatnonzero(~(np.isfinite(p) & (p >= 0) & (p <= 1)))[0])
            raise ValueError(f"PerformanceMonitor.log_prediction: prediction must be probabilities in [0, 1]; "
                             f"got {float(p[bad])!r} at row {bad}")
        y = _actuals(actual, n)
        feats = _columns(features, n, single, "features")
        segs = _columns(segment, n, single, "segment", as_text=True)
        rids = _request_ids(request_id, n, single)
        base: list[float | None] = [None] * n
        if self.baseline_model is not None:
            if features is None:
                raise ValueError("PerformanceMonitor.log_prediction: baseline_model is set, so pass features= "
                                 "to score the same rows with it")
            bp = np.asarray(self.baseline_model.predict(_frame(features, n, single)), dtype=np.float64).ravel()
            if bp.size != n:
                raise ValueError(f"PerformanceMonitor.baseline_model: predict returned {bp.size} values for {n} rows")
            base = bp.tolist()
        return self.store.add(p, y, base, rids, {"feature": feats, "segment": segs})

    def log_outcome(self, request_id: Any, actual: Any) -> int:
        """Attach outcomes to earlier predictions by request id (one id and 0/1, or two sequences);
        return how many were found. Unknown ids are counted out, not raised: a late outcome must not
        break the caller."""
        ids = [request_id] if isinstance(request_id, (str, numbers.Number)) else list(request_id)
        acts = np.atleast_1d(np.asarray(actual, dtype=np.float64))
        if acts.size != len(ids):
            raise ValueError(f"PerformanceMonitor.log_outcome: {len(ids)} request ids but {acts.size} outcomes")
        if np.any((acts != 0) & (acts != 1)):
            raise ValueError(f"PerformanceMonitor.log_outcome: actual must be 0 or 1, got {float(acts[(acts != 0) & (acts != 1)][0])!r}")
        return self.store.set_outcomes([str(i) for i in ids], acts.tolist())

    # ------------------------------------------------------------------ windows
    @property
    def complete_windows(self) -> int:
        return self.store.last_seq() // self.window_size

    def _bounds(self, k: int) -> tuple[int, int]:
        return k * self.window_size + 1, (k + 1) * self.window_size

    def _reference_bounds(self) -> tuple[int, int]:
        return 1, self.reference_windows * self.window_size

    def _window(self, k: int) -> dict[str, Any]:
        return self.store.rows(*self._bounds(k))

    def _metric_values(self, p: np.ndarray, y: np.ndarray, prefix: str = "") -> dict[str, float]:
        lab = np.isfinite(y)
        out: dict[str, float] = {}
        for name in self.metrics:
            out[prefix + name] = float(METRICS[name](p[lab], y[lab])) if lab.any() else math.nan
        return out

    def get_current_metrics(self, by_segment: bool = False) -> dict[str, Any]:
        """Metrics over the latest `window_size` predictions (those with outcomes), the reference
        window's beside them, and the baseline model's; with by_segment, the same per segment value."""
        last = self.store.last_seq()
        rows = self.store.rows(max(1, last - self.window_size + 1), last)
        lab = np.isfinite(rows["actual"])
        out: dict[str, Any] = {"rows": int(rows["seq"].size), "labeled": int(lab.sum()),
                               "first_seq": int(rows["seq"][0]) if rows["seq"].size else None, "last_seq": last}
        out.update(self._metric_values(rows["prediction"], rows["actual"]))
        if self.baseline_model is not None and lab.any():
            out.update(self._metric_values(rows["baseline"], rows["actual"], "baseline/"))
        if last >= self.reference_windows * self.window_size:
            ref = self.store.rows(*self._reference_bounds())
            out.update(self._metric_values(ref["prediction"], ref["actual"], "reference/"))
        if by_segment:
            out["segments"] = self._by_segment(rows, max(1, last - self.window_size + 1), last)
        return out

    def _by_segment(self, rows: dict[str, Any], first: int, last: int) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        lab = np.isfinite(rows["actual"])
        for key in self.store.names("segment"):
            vals = self.store.column("segment", key, first, last)[1].astype(str)
            out[key] = {}
            for v in np.unique(vals):
                sel = (vals == v) & lab
                entry = {"rows": int((vals == v).sum()), "labeled": int(sel.sum())}
                if sel.any():
                    entry.update(self._metric_values(rows["prediction"][sel], rows["actual"][sel]))
                out[key][str(v)] = entry
        return out

    # ------------------------------------------------------------------ drift
    def detect_drift(self, window: int | None = None, emit: bool = True) -> DriftReport:
        """Test window `window` (default: the latest complete one) against the reference windows.

        Returns a DriftReport; each fired test is also sent to `alerts` (emit=False: not) and the
        check is stored. With fewer than two complete windows there is nothing to compare yet.
        """
        done = self.complete_windows
        k = done - 1 if window is None else int(window)
        if k < self.reference_windows or k >= done:
            return DriftReport(None, False, self.alert_threshold, [],
                               f"need a window >= {self.reference_windows} (after the reference) among {done} "
                               f"complete window(s) of {self.window_size}")
        ref, cur = self.store.rows(*self._reference_bounds()), self._window(k)
        plan = self._plan(k, ref, cur)
        alpha = self.alert_threshold / max(len(plan), 1)
        results = [test(alpha) for test in plan]
        report = DriftReport(k, any(r.drifted for r in results), self.alert_threshold, results)
        self.store.add_check(k, report.drifted, report.to_dict())
        if emit:
            for r in report.fired:
                self.alerts.emit(self._alert(r, k))
        return report

    def _plan(self, k: int, ref: dict[str, Any], cur: dict[str, Any]) -> list[Any]:
        """The tests of window k against the reference, as callables of the per-test level."""
        plan: list[Any] = []
        pr, pc = ref["prediction"], cur["prediction"]
        plan += [lambda a: ks(pr, pc, "score", a), lambda a: psi(pr, pc, "score", alpha=a)]
        for name in self.store.names("feature"):
            r_num, r_cat = self.store.column("feature", name, *self._reference_bounds())
            c_num, c_cat = self.store.column("feature", name, *self._bounds(k))
            subject = f"feature:{name}"
            if not (np.isfinite(r_num) | pd.notna(r_cat)).any():
                continue
            if not pd.notna(r_cat).any():  # a numeric feature: no category in the reference
                r, c = r_num[np.isfinite(r_num)], c_num[np.isfinite(c_num)]
                if c.size:
                    plan += [lambda a, r=r, c=c, s=subject: ks(r, c, s, a),
                             lambda a, r=r, c=c, s=subject: psi(r, c, s, alpha=a)]
            else:
                r = _as_categories(r_num, r_cat)
                c = _as_categories(c_num, c_cat)
                plan.append(lambda a, r=r, c=c, s=subject: psi_categorical(r, c, s, a))
        lr, lc = np.isfinite(ref["actual"]), np.isfinite(cur["actual"])
        if lr.sum() and lc.sum():
            yr, yc = ref["actual"][lr], cur["actual"][lc]
            plan.append(lambda a: calibration_drift(pr[lr], yr, pc[lc], yc, "model", a))
            for key in self.store.names("segment"):
                sr = self.store.column("segment", key, *self._reference_bounds())[1].astype(str)[lr]
                sc = self.store.column("segment", key, *self._bounds(k))[1].astype(str)[lc]
                plan.append(lambda a, key=key, sr=sr, sc=sc: segment_calibration_drift(
                    sr, pr[lr], yr, sc, pc[lc], yc, f"segment:{key}", a))
            plan.append(self._page_hinkley_test(pr[lr], yr, cur["seq"][-1]))
            if self.baseline_model is not None:
                plan.append(lambda a: _baseline_gap(pc[lc], cur["baseline"][lc], yc, a))
        return plan

    def _page_hinkley_test(self, p_ref: np.ndarray, y_ref: np.ndarray, last_seq: int) -> Any:
        since = self.store.rows(self._reference_bounds()[1] + 1, int(last_seq))
        lab = np.isfinite(since["actual"])
        stream = _row_logloss(since["prediction"][lab], since["actual"][lab])
        reference = _row_logloss(p_ref, y_ref)

        def test(alpha: float) -> DriftResult:
            return PageHinkley(delta=self.page_hinkley.delta, alpha=alpha).run(reference, stream, "loss")

        return test

    def _alert(self, r: DriftResult, window: int) -> Alert:
        severe = (r.p_value is not None and r.p_value < r.threshold / 100) or (r.p_value is None and r.statistic > 2 * r.threshold)
        shown = f"p={r.p_value:.2g} < {r.threshold:.2g}" if r.p_value is not None else f"{r.statistic:.3g} > {r.threshold:.3g}"
        return Alert(source=SOURCE, kind=KINDS.get(r.test, r.test), subject=r.subject,
                     severity="critical" if severe else "warning",
                     message=f"{r.subject}: {r.test} drift in window {window} vs the reference ({shown})",
                     details={"test": r.test, "window": window, "statistic": r.statistic, "p_value": r.p_value,
                              "threshold": r.threshold, **_jsonable(r.details)})

    # ------------------------------------------------------------------ report
    def window_metrics(self) -> pd.DataFrame:
        """One row per window (the last may be partial): rows, labeled, and each metric."""
        last = self.store.last_seq()
        rows = self.store.rows(1, last)
        out = []
        for k in range(math.ceil(last / self.window_size)):
            sel = slice(k * self.window_size, (k + 1) * self.window_size)
            p, y = rows["prediction"][sel], rows["actual"][sel]
            entry = {"window": k, "rows": int(p.size), "labeled": int(np.isfinite(y).sum())}
            entry.update(self._metric_values(p, y))
            if self.baseline_model is not None:
                entry.update(self._metric_values(rows["baseline"][sel], y, "baseline/"))
            out.append(entry)
        return pd.DataFrame(out)

    def generate_report(self, out_dir: str | Path | None = None) -> dict[str, Any]:
        """Counts, current metrics (with segments), metrics per window, the latest check and the
        check history, plus a markdown summary. With out_dir, also writes report.json, report.md and
        metrics_over_windows.png there."""
        per_window = self.window_metrics()
        checks = self.store.checks()
        latest = checks[-1] if checks else None
        report: dict[str, Any] = {
            "config": {"metrics": self.metrics, "window_size": self.window_size,
                       "alert_threshold": self.alert_threshold, "baseline_model": type(self.baseline_model).__name__
                       if self.baseline_model is not None else None, "storage": self.store.path},
            "counts": self.store.counts(),
            "current": self.get_current_metrics(by_segment=True),
            "windows": per_window.to_dict(orient="records"),
            "latest_check": latest,
            "drift_windows": [c["window"] for c in checks if c["drifted"]],
        }
        report["markdown"] = _markdown(report, per_window)
        if out_dir is not None:
            import json

            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            report["plot"] = str(self._plot(per_window, [c["window"] for c in checks if c["drifted"]],
                                            out / "metrics_over_windows.png"))
            (out / "report.md").write_text(report["markdown"])
            (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2, default=str))
        return report

    def _plot(self, per_window: pd.DataFrame, drifted: list[int], path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(self.metrics), 1, figsize=(7, 1.8 * len(self.metrics) + 0.6), sharex=True,
                                 squeeze=False)
        for ax, name in zip(axes[:, 0], self.metrics):
            if not per_window.empty:
                ax.plot(per_window["window"], per_window[name], marker="o", ms=3, label="model")
                if f"baseline/{name}" in per_window:
                    ax.plot(per_window["window"], per_window[f"baseline/{name}"], ls="--", label="baseline")
            for w in drifted:
                ax.axvspan(w - 0.5, w + 0.5, color="tab:red", alpha=0.15, lw=0)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(f"metrics per window of {self.window_size} predictions (red: drift detected)")
        axes[-1, 0].set_xlabel("window")
        if self.baseline_model is not None:
            axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def reset(self) -> None:
        """Forget every logged prediction, outcome and check; the next windows form the new reference."""
        self.store.clear()
        self.store.set_meta("window_size", self.window_size)
        self.store.set_meta("reference_windows", self.reference_windows)

    def close(self) -> None:
        self.store.close()


# ---------------------------------------------------------------------- helpers
def _actuals(actual: Any, n: int) -> list[float | None]:
    if actual is None:
        return [None] * n
    a = np.atleast_1d(np.asarray(actual, dtype=object))
    if a.size != n:
        raise ValueError(f"PerformanceMonitor.log_prediction: actual has {a.size} values for {n} predictions")
    out: list[float | None] = []
    for i, v in enumerate(a):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif v in (0, 1):
            out.append(float(v))
        else:
            raise ValueError(f"PerformanceMonitor.log_prediction: actual must be 0, 1 or None; got {v!r} at row {i}")
    return out


def _frame(data: Any, n: int, single: bool) -> pd.DataFrame:
    """features / segment as a DataFrame of n rows (a dict is one row when logging one prediction)."""
    if isinstance(data, pd.DataFrame):
        frame = data.reset_index(drop=True)
    elif single and isinstance(data, Mapping):
        frame = pd.DataFrame({k: [v] for k, v in data.items()})
    elif isinstance(data, Mapping):
        frame = pd.DataFrame({k: list(v) for k, v in data.items()})
    else:
        frame = pd.DataFrame.from_records(list(data))
    return frame


def _columns(data: Any, n: int, single: bool, name: str, as_text: bool = False) -> dict[str, np.ndarray]:
    """Scalar columns of features / segment: numbers as float64 (bools are categories), the rest as
    objects (as_text: every column as strings, e.g. segment keys); columns holding arrays (images)
    are left out."""
    if data is None:
        return {}
    frame = _frame(data, n, single)
    if len(frame) != n:
        raise ValueError(f"PerformanceMonitor.log_prediction: {name} has {len(frame)} rows for {n} predictions")
    out: dict[str, np.ndarray] = {}
    for col in frame.columns:
        s = frame[col]
        if as_text:
            out[str(col)] = np.array([None if pd.isna(x) else str(x) for x in s.to_numpy(dtype=object)], dtype=object)
        elif pd.api.types.is_bool_dtype(s):
            out[str(col)] = s.astype(str).to_numpy(dtype=object)
        elif pd.api.types.is_numeric_dtype(s):
            out[str(col)] = s.to_numpy(dtype=np.float64)
        else:
            v = s.to_numpy(dtype=object)
            first = next((x for x in v if x is not None), None)
            if first is None or _is_scalar(first):
                out[str(col)] = v
    return out


def _request_ids(request_id: Any, n: int, single: bool) -> list[str | None]:
    if request_id is None:
        return [None] * n
    ids = [request_id] if single or isinstance(request_id, str) else list(request_id)
    if len(ids) != n:
        raise ValueError(f"PerformanceMonitor.log_prediction: request_id has {len(ids)} values for {n} predictions")
    return [None if i is None else str(i) for i in ids]


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, numbers.Number, np.generic))


def _as_categories(num: np.ndarray, cat: np.ndarray) -> np.ndarray:
    """One category array from a column's (numbers, categories); absent values are left out."""
    out = cat.copy()
    has_num = np.isfinite(num)
    out[has_num] = [repr(float(x)) for x in num[has_num]]
    return out[pd.notna(out)].astype(str)


def _row_logloss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    pc = np.clip(p, 1e-12, 1 - 1e-12)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


def _baseline_gap(p: np.ndarray, b: np.ndarray, y: np.ndarray, alpha: float) -> DriftResult:
    """Is the live model's log loss higher than the baseline's on the same rows? (paired t-test)"""
    ok = np.isfinite(b)
    diff = _row_logloss(p[ok], y[ok]) - _row_logloss(b[ok], y[ok])
    if diff.size < 2 or np.all(diff == diff[0]):
        return DriftResult("baseline_gap", "model", float(diff.mean()) if diff.size else 0.0, 1.0, alpha, False,
                           {"rows": int(diff.size)})
    res = stats.ttest_1samp(diff, 0.0, alternative="greater")
    return DriftResult("baseline_gap", "model", float(diff.mean()), float(res.pvalue), alpha, float(res.pvalue) < alpha,
                       {"rows": int(diff.size), "model_logloss": float(_row_logloss(p[ok], y[ok]).mean()),
                        "baseline_logloss": float(_row_logloss(b[ok], y[ok]).mean())})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _markdown(report: dict[str, Any], per_window: pd.DataFrame) -> str:
    cfg, cur, counts = report["config"], report["current"], report["counts"]
    lines = [
        "# Performance monitor report", "",
        (f"{counts['predictions']} predictions logged, {counts['labeled']} with outcomes; windows of "
         f"{cfg['window_size']}; {counts['checks']} drift checks, drift in windows {report['drift_windows'] or 'none'}."),
        "", "## Current window", "", "| metric | current | reference |" + (" baseline |" if cfg["baseline_model"] else ""),
        "| --- | --- | --- |" + (" --- |" if cfg["baseline_model"] else ""),
    ]
    for m in cfg["metrics"]:
        row = f"| {m} | {_fmt(cur.get(m))} | {_fmt(cur.get('reference/' + m))} |"
        lines.append(row + (f" {_fmt(cur.get('baseline/' + m))} |" if cfg["baseline_model"] else ""))
    latest = report["latest_check"]
    if latest:
        lines += ["", f"## Latest drift check (window {latest['window']}, family-wise level {latest['alpha']})", "",
                  "| test | subject | statistic | p-value | threshold | drifted |", "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(latest["results"], key=lambda r: (not r["drifted"], r["p_value"] if r["p_value"] is not None else 1)):
            lines.append(f"| {r['test']} | {r['subject']} | {_fmt(r['statistic'])} | {_fmt(r['p_value'])} | "
                         f"{_fmt(r['threshold'])} | {'**yes**' if r['drifted'] else 'no'} |")
    if not per_window.empty:
        lines += ["", "## Metrics per window", "", "| window | rows | labeled | " + " | ".join(cfg["metrics"]) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in cfg["metrics"]) + " |"]
        for r in per_window.to_dict(orient="records"):
            lines.append(f"| {r['window']} | {r['rows']} | {r['labeled']} | "
                         + " | ".join(_fmt(r[m]) for m in cfg["metrics"]) + " |")
    for key, values in (cur.get("segments") or {}).items():
        lines += ["", f"## Current window by {key}", "", "| value | rows | labeled | " + " | ".join(cfg["metrics"]) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in cfg["metrics"]) + " |"]
        for v, e in sorted(values.items(), key=lambda kv: -kv[1]["rows"])[:20]:
            lines.append(f"| {v} | {e['rows']} | {e['labeled']} | " + " | ".join(_fmt(e.get(m)) for m in cfg["metrics"]) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["METRICS", "DriftReport", "PerformanceMonitor"]
