"""Alerts: one record type, pluggable sinks, and a router that de-duplicates.

AnomalyDetector and PerformanceMonitor raise `Alert`s through an `AlertRouter`; each sink delivers
them somewhere (`LogSink`: the log, `JsonlSink`: a JSON-lines file, `WebhookSink`: an HTTP POST). An alert's `key` says what it is about
(source + kind + subject); the router drops a repeat of a key inside `dedupe_seconds`, so a
detector that fires on every batch of a lasting problem does not page anyone twice.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

log = logging.getLogger(__name__)
SEVERITIES = ("info", "warning", "critical")


@dataclasses.dataclass(frozen=True)
class Alert:
    """What happened, to what, how bad, and the evidence.

    source: who raised it ("anomaly_detector", "performance_monitor", ...).
    kind: what was seen ("spike", "drop", "level_shift", "drift", "calibration_drift", ...).
    subject: what it is about (an account id, "feature:bid", "model"), part of the de-duplication key.
    severity: info | warning | critical.
    details: JSON-serialisable evidence (scores, thresholds, windows).
    """

    source: str
    kind: str
    subject: str
    severity: str
    message: str
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    time: str = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert.severity: {self.severity!r} is not one of {SEVERITIES}")

    @property
    def key(self) -> str:
        """Stable id of what the alert is about (not when): source, kind and subject."""
        return f"{self.source}:{self.kind}:{self.subject}"

    @property
    def id(self) -> str:
        """Unique id of this alert (key + time): receivers de-duplicate retried deliveries with it."""
        return hashlib.sha256(f"{self.key}@{self.time}".encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, **dataclasses.asdict(self), "details": dict(self.details)}


class AlertSink(Protocol):
    """Delivers one alert; raises if it could not (the router logs it and goes on to the next sink)."""

    def send(self, alert: Alert) -> None: ...


class LogSink:
    """Alerts as log records: critical -> ERROR, warning -> WARNING, info -> INFO."""

    LEVELS: ClassVar[dict[str, int]] = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}

    def __init__(self, logger: str = "within.alerts") -> None:
        self.logger = logging.getLogger(logger)

    def send(self, alert: Alert) -> None:
        self.logger.log(self.LEVELS[alert.severity], "[%s] %s: %s", alert.key, alert.severity, alert.message)


class JsonlSink:
    """One JSON object per line, appended and flushed per alert, so a crash loses nothing sent."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> None:
        line = json.dumps(alert.to_dict(), default=str)
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


class WebhookSink:
    """POSTs each alert's JSON to `url` with its id in an `Idempotency-Key` header.

    Connection errors, timeouts, 429 and 5xx are retried up to `retries` times, waiting
    backoff * 2**attempt seconds between tries; another 4xx is the receiver saying no, and is not
    retried. After the last try the failure is logged, never raised: a monitor must not die because
    a pager is down. A retried POST carries the same key, so a receiver that saw the first one
    (and failed to answer) can drop the repeat. Uses the stdlib (urllib), blocking the caller for
    at most (retries + 1) * timeout plus the backoff.
    """

    RETRY_STATUS: ClassVar[frozenset[int]] = frozenset({408, 425, 429, 500, 502, 503, 504})

    def __init__(self, url: str, timeout: float = 5.0, retries: int = 3, backoff: float = 0.5,
                 headers: Mapping[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"WebhookSink.url: must start with http:// or https://, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"WebhookSink.timeout: must be > 0 seconds, got {timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"WebhookSink.retries: must be an int >= 0, got {retries!r}")
        if not backoff >= 0:
            raise ValueError(f"WebhookSink.backoff: must be >= 0 seconds, got {backoff!r}")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), retries, float(backoff)
        self.headers = dict(headers or {})
        self.delivered = 0
        self.failed = 0

    def send(self, alert: Alert) -> None:
        import urllib.error
        import urllib.request

        body = json.dumps(alert.to_dict(), default=str).encode("utf-8")
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.id, **self.headers}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                self.delivered += 1
                return
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
                if err.code not in self.RETRY_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        self.failed += 1
        log.error("webhook %s: alert %s (%s) not delivered after %d attempt(s): %s", self.url, alert.id, alert.key,
                  attempt + 1, last)


class AlertRouter:
    """Sends each alert to every sink, once per key per `dedupe_seconds` (0: never de-duplicate).

    A sink that raises is logged and skipped; the other sinks still get the alert.
    `min_severity` drops alerts below it (e.g. "warning" keeps warning and critical).
    """

    def __init__(self, sinks: Iterable[AlertSink] = (), dedupe_seconds: float = 3600.0,
                 min_severity: str = "info", clock: Any = time.monotonic) -> None:
        if min_severity not in SEVERITIES:
            raise ValueError(f"min_severity: {min_severity!r} is not one of {SEVERITIES}")
        if not dedupe_seconds >= 0:
            raise ValueError(f"dedupe_seconds must be >= 0, got {dedupe_seconds!r}")
        self.sinks = list(sinks) or [LogSink()]
        self.dedupe_seconds = float(dedupe_seconds)
        self.min_severity = min_severity
        self._clock = clock
        self._last_sent: dict[str, float] = {}
        self._lock = threading.Lock()
        self.sent: list[Alert] = []

    def emit(self, alert: Alert) -> bool:
        """Deliver `alert`; False when it was dropped (below min_severity, or a repeat of its key)."""
        if SEVERITIES.index(alert.severity) < SEVERITIES.index(self.min_severity):
            return False
        now = self._clock()
        with self._lock:
            last = self._last_sent.get(alert.key)
            if self.dedupe_seconds and last is not None and now - last < self.dedupe_seconds:
                return False
            self._last_sent[alert.key] = now
            self.sent.append(alert)
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception as err:  # noqa: BLE001 - one broken sink must not silence the others
                log.error("alert sink %s failed for %s: %s: %s", type(sink).__name__, alert.key,
                          type(err).__name__, err)
        return True


__all__ = ["SEVERITIES", "Alert", "AlertRouter", "AlertSink", "JsonlSink", "LogSink", "WebhookSink"]
