"""The HTTP API (FastAPI TestClient): scores equal the model's, malformed requests are 422s that
name the field, oversized batches are refused with the limit, a crash shows no traceback."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks.serve_load import free_port, jsonable_record, malformed_requests, start_server, stop_server
from tests.conftest import ROOT
from tests.test_serve_bundle import frame, simulator_spec, tiny_bundle
from within.serve import ScoringService, create_app, load_served


class RecordingMonitor:
    """The PerformanceMonitor surface the service calls (thread-safe log_prediction / log_outcome)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.predictions: list[tuple[str, float]] = []
        self.outcomes: list[tuple[str, float]] = []

    def log_prediction(self, prediction: float, request_id: str) -> None:
        with self.lock:
            self.predictions.append((request_id, prediction))

    def log_outcome(self, request_id: str, actual: float) -> None:
        with self.lock:
            self.outcomes.append((request_id, actual))


def explain_by_budget(records: list[dict]) -> list[dict]:
    return [{"budget": float(np.log1p(r["budget"])), "bias": -1.0} for r in records]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return load_served(tiny_bundle(tmp_path_factory.mktemp("serve"), calibrator="spline"))


@pytest.fixture(scope="module")
def monitor() -> RecordingMonitor:
    return RecordingMonitor()


@pytest.fixture(scope="module")
def client(served, monitor) -> TestClient:
    service = ScoringService(served, max_batch=64, explainer=explain_by_budget, monitor=monitor)
    return TestClient(create_app(service), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def ads(served) -> list[dict]:
    names = served.model.processor.spec.names
    return [jsonable_record(r) for r in frame(60, seed=21)[names].to_dict("records")]


def test_predict_one_ad_and_a_batch_match_the_model(client, served, ads):
    want = served.model.predict(frame(60, seed=21))
    one = client.post("/predict", json=ads[0])
    assert one.status_code == 200
    body = one.json()
    assert body["score"] == pytest.approx(want[0], abs=1e-6) and body["request_id"] and body["model_version"]
    batch = client.post("/predict", json=ads).json()
    np.testing.assert_allclose(batch["scores"], want, atol=1e-6, rtol=0)


def test_intervals_and_alpha(client, served, ads):
    df = frame(60, seed=21)
    _, lo, hi = served.model.predict_with_intervals(df, alpha=0.2)
    body = client.post("/predict_with_intervals?alpha=0.2", json=ads).json()
    assert body["alpha"] == 0.2
    np.testing.assert_allclose(body["lowers"], lo, atol=1e-6, rtol=0)
    np.testing.assert_allclose(body["uppers"], hi, atol=1e-6, rtol=0)
    single = client.post("/predict_with_intervals", json=ads[0]).json()
    assert single["lower"] <= single["score"] <= single["upper"] and single["alpha"] == 0.1


def test_request_id_header_is_echoed_and_predictions_reach_the_monitor(client, monitor, ads):
    r = client.post("/predict", json=ads[:3], headers={"X-Request-ID": "auction-42"})
    assert r.json()["request_id"] == "auction-42" and r.headers["x-request-id"] == "auction-42"
    logged = dict(monitor.predictions)
    for i, score in enumerate(r.json()["scores"]):
        assert logged[f"auction-42/{i}"] == pytest.approx(score)
    r = client.post("/predict", json=ads[0], headers={"X-Request-ID": "bad id with spaces"})
    assert r.json()["request_id"] != "bad id with spaces"
    ok = client.post("/outcome", json={"request_id": "auction-42/0", "actual": 1})
    assert ok.status_code == 200 and monitor.outcomes[-1] == ("auction-42/0", 1.0)
    bad = client.post("/outcome", json={"request_id": "x", "actual": 3})
    assert bad.status_code == 422 and "'actual'" in bad.json()["detail"]


def test_explain_calls_the_plugged_explainer(client, ads):
    one = client.post("/explain", json=ads[0]).json()
    assert one["explanation"]["budget"] == pytest.approx(np.log1p(ads[0]["budget"]))
    many = client.post("/explain", json=ads[:4]).json()
    assert len(many["explanations"]) == 4


def test_malformed_requests_are_422_naming_the_field(client, served, ads):
    fields = {f.name: f.type for f in served.model.processor.spec.fields}
    cases = malformed_requests(ads[0], fields)
    assert len(cases) >= 15
    for what, path, body, field in cases:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        assert f"'{field}'" in detail, (what, detail)
        assert "Traceback" not in r.text and r.json()["request_id"]


def test_oversized_batch_is_refused_with_the_limit(client, ads):
    r = client.post("/predict", json=[ads[0]] * 65)
    assert r.status_code == 413
    assert "batch of 65 ads exceeds max_batch=64" in r.json()["detail"]


def test_server_error_shows_no_traceback(served, ads, monkeypatch):
    service = ScoringService(served)
    client = TestClient(create_app(service), raise_server_exceptions=False)

    def broken(records):
        raise RuntimeError("secret internal state")

    monkeypatch.setattr(service.scorer, "predict", broken)
    r = client.post("/predict", json=ads[0])
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.json()["detail"].startswith("internal server error") and r.json()["request_id"]
    assert client.post("/explain", json=ads[0]).status_code == 501  # no explainer: says so, not a 500


def test_health_metadata_metrics(client, served):
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["model_version"] == served.model_version
    assert [f["name"] for f in meta["spec"]["fields"]] == served.model.processor.spec.names
    assert meta["metrics"] == {"test/auc": 0.5} and meta["privacy"] == {"enabled": False}
    assert meta["limits"]["max_batch"] == 64 and meta["onnx_graph"] == "exported in memory"
    text = client.get("/metrics").text
    assert 'within_requests_total{endpoint="predict",status="200"}' in text
    assert "within_request_seconds_bucket" in text and "within_model_info" in text
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "budget" in body["anyOf"][0]["properties"]


@pytest.mark.slow
def test_serve_py_starts_on_loopback_and_answers(tmp_path):
    bundle = tiny_bundle(tmp_path, n=600, text=False, image=False, onnx=True)
    import httpx

    port = free_port()
    proc = start_server(bundle, port, ["max_batch=8"], timeout_s=180)
    try:
        names = [f.name for f in simulator_spec(text=False, image=False).fields]
        ad = jsonable_record(frame(1, seed=3)[names].to_dict("records")[0])
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json=ad, timeout=30)
        assert r.status_code == 200 and 0 < r.json()["score"] < 1
        assert httpx.post(f"http://127.0.0.1:{port}/predict", json=[ad] * 9, timeout=30).status_code == 413
    finally:
        stop_server(proc)


def test_serve_py_without_a_bundle_is_one_error_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "serve.py"), f"bundle={tmp_path / 'missing'}",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: bundle:")
    assert "Traceback" not in out.stderr
