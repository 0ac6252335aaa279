"""Alert records, sinks and the de-duplicating router; the webhook sink against a local receiver."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from within.monitoring.alerts import Alert, AlertRouter, JsonlSink, LogSink, WebhookSink


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


# ---- WebhookSink against a local receiver -------------------------------------------------------
class Receiver:
    """127.0.0.1 HTTP receiver: `fail_first` answers the first POST with that status after recording
    it (a delivery whose answer is lost); `delay` sleeps before answering; de-duplicates by key."""

    def __init__(self, fail_first: int | None = None, status: int = 200, delay: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.accepted: dict[str, dict] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers["Idempotency-Key"]
                outer.requests.append({"key": key, "body": body})
                time.sleep(delay)
                outer.accepted.setdefault(key, body)  # a repeat of a seen key is dropped
                code = fail_first if fail_first is not None and len(outer.requests) == 1 else status
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_webhook_retries_a_failed_post_and_each_alert_lands_once():
    with Receiver(fail_first=503) as rx:
        sink = WebhookSink(rx.url, timeout=2.0, retries=3, backoff=0.01)
        router = AlertRouter([sink], dedupe_seconds=60)
        alerts = [_alert(subject=f"acct_{i}") for i in range(3)]
        for a in alerts:
            assert router.emit(a)
        assert not router.emit(_alert(subject="acct_0"))  # the router drops a repeat of a key
    assert len(rx.requests) == 4  # the first alert twice: its first answer was a 503
    assert rx.requests[0]["key"] == rx.requests[1]["key"] == alerts[0].id
    assert sorted(rx.accepted) == sorted(a.id for a in alerts)  # exactly once each, by id
    assert rx.accepted[alerts[1].id]["subject"] == "acct_1" and rx.accepted[alerts[1].id]["details"] == {"score": 7.5}
    assert (sink.delivered, sink.failed) == (3, 0)


def test_webhook_gives_up_quietly_on_a_dead_receiver(caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", timeout=0.5, retries=2, backoff=0.01)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR):
        sink.send(_alert())  # does not raise
    assert time.monotonic() - start < 5
    assert sink.failed == 1 and "not delivered after 3 attempt(s)" in caplog.text


def test_webhook_times_out_and_does_not_retry_a_4xx(caplog):
    with Receiver(delay=1.0) as slow:
        sink = WebhookSink(slow.url, timeout=0.2, retries=1, backoff=0.0)
        start = time.monotonic()
        with caplog.at_level(logging.ERROR):
            sink.send(_alert())
        assert time.monotonic() - start < 3 and sink.failed == 1
        assert len(slow.requests) == 2  # timed out, retried once
    with Receiver(status=400) as strict:
        sink = WebhookSink(strict.url, retries=3, backoff=0.0)
        sink.send(_alert())
        assert len(strict.requests) == 1 and sink.failed == 1
    assert "HTTP 400" in caplog.text


def test_webhook_arguments():
    with pytest.raises(ValueError, match="WebhookSink.url: must start with http:// or https://"):
        WebhookSink("ftp://x")
    with pytest.raises(ValueError, match="WebhookSink.retries: must be an int >= 0, got -1"):
        WebhookSink("http://127.0.0.1:1", retries=-1)
