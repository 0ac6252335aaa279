"""PerformanceMonitor: logging (single, batch, late outcomes), metrics against a direct computation,
drift checks and their alerts, the baseline comparison, threads, the report, reset and errors."""
from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from within.calibration import metrics as M
from within.monitoring.alerts import AlertRouter, JsonlSink
from within.monitoring.monitor import PerformanceMonitor

W = 1000


def _stream(rng, n, shift=0.0, ctr_factor=1.0):
    x = rng.normal(size=n) + shift
    device = rng.choice(["mobile", "desktop"], n, p=[0.6, 0.4])
    p = 1 / (1 + np.exp(-(-2.5 + 0.6 * x)))
    y = (rng.random(n) < np.minimum(p * ctr_factor, 1)).astype(float)
    acc = rng.integers(0, 8, n)
    return p, y, pd.DataFrame({"x": x, "device": device}), {"account_id": acc.tolist()}


def test_single_and_batch_logging_and_late_outcomes():
    mon = PerformanceMonitor(window_size=W)
    assert mon.log_prediction(0.2, 1, features={"x": 1.5, "device": "mobile", "main_image": np.zeros((3, 4, 4))},
                              segment={"account_id": "a1"}, request_id="r0") == (1, 1)
    first, last = mon.log_prediction(np.array([0.1, 0.3, 0.5]), request_id=["r1", "r2", "r3"])
    assert (first, last) == (2, 4)
    assert mon.store.counts()["labeled"] == 1
    assert mon.log_outcome("r2", 1) == 1
    assert mon.log_outcome(["r1", "r3", "nope"], [0, 1, 0]) == 2  # unknown ids are counted out
    rows = mon.store.rows(1, 4)
    assert rows["actual"].tolist() == [1.0, 0.0, 1.0, 1.0] and rows["request_id"] == ["r0", "r1", "r2", "r3"]
    assert mon.store.names("feature") == ["device", "x"]  # the image is not stored
    x, _ = mon.store.column("feature", "x", 1, 4)
    assert x[0] == 1.5 and np.isnan(x[1:]).all()
    assert mon.store.column("feature", "device", 1, 1)[1].tolist() == ["mobile"]
    assert mon.store.column("segment", "account_id", 1, 2)[1].tolist() == ["a1", None]
    with pytest.raises(ValueError, match="request_id of this batch was logged before"):
        mon.log_prediction(0.4, request_id="r0")
    assert mon.store.counts()["predictions"] == 4  # the failed batch left nothing behind


def test_current_metrics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    mon = PerformanceMonitor(metrics=["auc", "logloss", "calib_ratio", "ece", "brier"], window_size=W)
    p, y, feats, seg = _stream(rng, 2500)
    mon.log_prediction(p, y, features=feats, segment=seg)
    cur = mon.get_current_metrics(by_segment=True)
    last = slice(2500 - W, 2500)
    assert cur["rows"] == W and cur["first_seq"] == 1501
    assert cur["auc"] == pytest.approx(M.auc(p[last], y[last]))
    assert cur["logloss"] == pytest.approx(M.logloss(p[last], y[last]))
    assert cur["calib_ratio"] == pytest.approx(M.calibration_ratio(p[last], y[last]))
    assert cur["reference/ece"] == pytest.approx(M.ece(p[:W], y[:W]))
    acc = np.array(seg["account_id"])[last]
    sel = acc == 3
    assert cur["segments"]["account_id"]["3"]["rows"] == int(sel.sum())
    assert cur["segments"]["account_id"]["3"]["brier"] == pytest.approx(M.brier(p[last][sel], y[last][sel]))
    windows = mon.window_metrics()
    assert windows["rows"].tolist() == [W, W, 500]
    assert windows.loc[1, "auc"] == pytest.approx(M.auc(p[W:2 * W], y[W:2 * W]))


def test_detect_drift_is_quiet_then_fires_and_alerts_once(tmp_path):
    rng = np.random.default_rng(1)
    sink = JsonlSink(tmp_path / "alerts.jsonl")
    mon = PerformanceMonitor(window_size=W, alerts=AlertRouter([sink], dedupe_seconds=3600))
    assert mon.detect_drift().window is None  # nothing to compare yet
    for _ in range(4):
        mon.log_prediction(*_stream(rng, W)[:2], features=_stream(rng, W)[2], segment=_stream(rng, W)[3])
    quiet = [mon.detect_drift(window=k) for k in (1, 2, 3)]
    assert not any(r.drifted for r in quiet), [r.fired for r in quiet]
    assert sink.read() == []
    for _ in range(2):
        p, y, feats, seg = _stream(rng, W, shift=0.8)
        mon.log_prediction(p, y, features=feats, segment=seg)
        report = mon.detect_drift()
    fired = {f"{r.test}:{r.subject}" for r in report.fired}
    assert {"ks:feature:x", "psi:feature:x", "ks:score"} <= fired
    assert "chi2:feature:device" not in fired
    alerts = sink.read()
    # KS and PSI on x share one key; the second window repeats keys, which the router drops
    keys = [a["key"] for a in alerts]
    assert len(keys) == len(set(keys)) and "performance_monitor:feature_drift:feature:x" in keys
    assert mon.store.counts()["checks"] == 5
    assert all(r.threshold == pytest.approx(0.01 / len(report.results)) for r in report.results if r.p_value is not None)


def test_calibration_drift_by_segment_and_the_baseline_gap():
    rng = np.random.default_rng(2)

    class Baseline:
        def predict(self, X):
            return 1 / (1 + np.exp(-(-2.5 + 0.6 * X["x"].to_numpy())))  # the truth before the drift

    mon = PerformanceMonitor(window_size=4000, baseline_model=Baseline())
    for k in range(3):
        n = 4000
        x = rng.normal(size=n)
        acc = rng.integers(0, 10, n)
        truth = 1 / (1 + np.exp(-(-2.5 + 0.6 * x + (np.where(acc % 2 == 0, 0.6, -0.6) if k == 2 else 0))))
        live = 1 / (1 + np.exp(-(-2.5 + 0.3 * x)))  # a weaker model than the baseline
        mon.log_prediction(live, (rng.random(n) < truth).astype(float), features={"x": x},
                           segment={"account_id": acc.tolist()})
    assert not any(r.test == "segment_calibration" and r.drifted for r in mon.detect_drift(window=1).results)
    report = mon.detect_drift(window=2)
    by = {(r.test, r.subject): r for r in report.results}
    assert by[("segment_calibration", "segment:account_id")].drifted
    assert by[("baseline_gap", "model")].drifted and by[("baseline_gap", "model")].statistic > 0
    cur = mon.get_current_metrics()
    assert cur["baseline/logloss"] < cur["logloss"]  # same ranking (both monotone in x), better calibrated


def test_a_longer_reference_starts_checks_later_and_pools_its_windows():
    rng = np.random.default_rng(4)
    mon = PerformanceMonitor(window_size=W, reference_windows=3)
    for k in range(4):
        p, y, feats, seg = _stream(rng, W)
        mon.log_prediction(p, y, features=feats, segment=seg)
        if k == 2:
            assert mon.detect_drift().window is None  # windows 0-2 are all reference
    report = mon.detect_drift()
    assert report.window == 3 and not report.drifted
    psi_x = next(r for r in report.results if r.test == "psi" and r.subject == "feature:x")
    assert psi_x.details["reference_rows"] == 3 * W
    ref = mon.store.rows(1, 3 * W)
    assert mon.get_current_metrics()["reference/auc"] == pytest.approx(M.auc(ref["prediction"], ref["actual"]))
    with pytest.raises(ValueError, match="reference_windows: must be an int >= 1, got 0"):
        PerformanceMonitor(reference_windows=0)


def test_threads_log_and_join_outcomes_without_losing_rows():
    mon = PerformanceMonitor(window_size=100)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(150):
                mon.log_prediction(0.1, request_id=f"t{t}-{i}", features={"x": float(i)})
                if i % 3 == 0:
                    mon.log_outcome(f"t{t}-{i}", 1)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    counts = mon.store.counts()
    assert counts["predictions"] == 900 and counts["labeled"] == 300 and counts["last_seq"] == 900


def test_report_files_reset_and_reopen(tmp_path):
    rng = np.random.default_rng(3)
    db = tmp_path / "monitor.sqlite"
    mon = PerformanceMonitor(window_size=W, storage=db)
    for shift in (0.0, 0.0, 1.0):
        p, y, feats, seg = _stream(rng, W, shift=shift)
        mon.log_prediction(p, y, features=feats, segment=seg)
        mon.detect_drift()
    rep = mon.generate_report(tmp_path / "report")
    assert rep["drift_windows"] == [2] and rep["counts"]["predictions"] == 3 * W
    assert (tmp_path / "report" / "metrics_over_windows.png").stat().st_size > 5000
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Metrics per window" in md and "| ks | feature:x |" in md and "## Current window by account_id" in md
    mon.close()
    with pytest.raises(ValueError, match="was written with window_size=1000"):
        PerformanceMonitor(window_size=500, storage=db)
    again = PerformanceMonitor(window_size=W, storage=db)
    assert again.store.counts()["predictions"] == 3 * W and again.complete_windows == 3
    again.reset()
    assert again.store.counts() == {"predictions": 0, "labeled": 0, "last_seq": 0, "checks": 0}
    assert again.log_prediction(0.5) == (1, 1)  # numbering starts over: the next window 0 is the reference


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"PerformanceMonitor.metrics: \['f1'\] not known"):
        PerformanceMonitor(metrics=["auc", "f1"])
    with pytest.raises(ValueError, match="window_size: must be an int >= 20"):
        PerformanceMonitor(window_size=5)
    with pytest.raises(ValueError, match=r"alert_threshold: must be in \(0, 1\)"):
        PerformanceMonitor(alert_threshold=5)
    with pytest.raises(ValueError, match="baseline_model: needs a .predict"):
        PerformanceMonitor(baseline_model=object())
    mon = PerformanceMonitor()
    with pytest.raises(ValueError, match="prediction must be probabilities in \\[0, 1\\]; got 1.7 at row 1"):
        mon.log_prediction([0.2, 1.7])
    with pytest.raises(ValueError, match="actual must be 0, 1 or None; got 2 at row 0"):
        mon.log_prediction([0.2], [2])
    with pytest.raises(ValueError, match="features has 1 rows for 2 predictions"):
        mon.log_prediction([0.2, 0.3], features=[{"x": 1}])
    with pytest.raises(ValueError, match="log_outcome: actual must be 0 or 1"):
        mon.log_outcome("r", 0.5)
    with_baseline = PerformanceMonitor(baseline_model=type("B", (), {"predict": lambda self, X: np.zeros(len(X))})())
    with pytest.raises(ValueError, match="baseline_model is set, so pass features="):
        with_baseline.log_prediction(0.3)
