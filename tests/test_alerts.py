"""Alert records, sinks and the de-duplicating router."""
from __future__ import annotations

import logging

import pytest

from within.monitoring.alerts import Alert, AlertRouter, JsonlSink, LogSink


def _alert(subject: str = "acct_1", severity: str = "warning") -> Alert:
    return Alert(source="anomaly_detector", kind="drop", subject=subject, severity=severity,
                 message="clicks fell 60% below baseline", details={"score": 7.5})


def test_router_dedupes_by_key_within_the_window(tmp_path):
    now = [0.0]
    sink = JsonlSink(tmp_path / "alerts.jsonl")
    router = AlertRouter([sink], dedupe_seconds=60, clock=lambda: now[0])
    assert router.emit(_alert())
    assert not router.emit(_alert())             # same key, inside the window
    assert router.emit(_alert(subject="acct_2"))  # another subject
    now[0] = 61.0
    assert router.emit(_alert())                  # window passed
    rows = sink.read()
    assert [r["subject"] for r in rows] == ["acct_1", "acct_2", "acct_1"]
    assert rows[0]["details"] == {"score": 7.5} and rows[0]["key"] == "anomaly_detector:drop:acct_1"


def test_a_failing_sink_does_not_stop_the_others(tmp_path, caplog):
    class Broken:
        def send(self, alert):
            raise ConnectionError("down")

    good = JsonlSink(tmp_path / "a.jsonl")
    with caplog.at_level(logging.ERROR):
        assert AlertRouter([Broken(), good]).emit(_alert())
    assert len(good.read()) == 1
    assert "Broken failed" in caplog.text


def test_min_severity_and_bad_severity(caplog):
    router = AlertRouter([LogSink()], min_severity="critical")
    assert not router.emit(_alert(severity="warning"))
    with caplog.at_level(logging.ERROR, logger="within.alerts"):
        assert router.emit(_alert(severity="critical"))
    assert "clicks fell" in caplog.text
    with pytest.raises(ValueError, match="severity"):
        _alert(severity="urgent")
