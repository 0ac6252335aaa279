"""The prediction service logs every served prediction into a real PerformanceMonitor; outcomes join
later by request id, and the monitor's state survives a restart of the service."""
from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from benchmarks.serve_load import jsonable_record
from tests.test_serve_bundle import tiny_bundle
from within.data.simulator import simulate
from within.monitoring.monitor import PerformanceMonitor
from within.serve import ScoringService, create_app, load_served


def test_served_predictions_reach_the_monitor_and_outcomes_join_by_request_id(tmp_path):
    served = load_served(tiny_bundle(tmp_path / "bundle"))
    names = served.model.processor.spec.names
    rows = simulate(n=40, seed=5)
    ads = [jsonable_record(r) for r in rows[names].to_dict("records")]
    store = tmp_path / "monitor.db"
    monitor = PerformanceMonitor(window_size=20, storage=store)
    with TestClient(create_app(ScoringService(served, monitor=monitor))) as client:
        scores = []
        for i, ad in enumerate(ads):
            r = client.post("/predict", json=ad, headers={"X-Request-ID": f"auction-{i}"})
            assert r.status_code == 200
            scores.append(r.json()["score"])
        for i, clicked in enumerate(rows["clicked"].to_numpy()[:30]):
            assert client.post("/outcome", json={"request_id": f"auction-{i}", "actual": int(clicked)}).status_code == 200
    now = monitor.get_current_metrics()
    assert now["last_seq"] == 40 and now["rows"] == 20 and now["labeled"] == 10  # window: rows 21..40, 21..30 labeled
    monitor.close()
    again = PerformanceMonitor(window_size=20, storage=store)  # a restarted service reads the same state
    assert again.get_current_metrics()["last_seq"] == 40
    logged = again.store.rows(1, 40)
    np.testing.assert_allclose(logged["prediction"], scores, atol=1e-12)
    assert np.isfinite(logged["actual"][:30]).all() and np.isnan(logged["actual"][30:]).all()
