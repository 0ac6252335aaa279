"""Prometheus metrics of one service (its own registry, so several apps in one process stay apart)."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServeMetrics:
    """Requests by endpoint and status, latency and batch-size histograms, ads scored, model info."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, model_version: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("within_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("within_request_seconds", "Time from body read to response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ads = Counter("within_ads_scored", "Ads scored, by endpoint", ["endpoint"], registry=self.registry)
        self.batch = Histogram("within_batch_ads", "Ads per request", ["endpoint"], buckets=BATCH_BUCKETS,
                               registry=self.registry)
        Info("within_model", "The served bundle", registry=self.registry).info(
            {"model_name": str(model_name), "model_version": str(model_version)})

    def observe(self, endpoint: str, status: int, seconds: float, n_ads: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status == 200 and n_ads:
            self.ads.labels(endpoint).inc(n_ads)
            self.batch.labels(endpoint).observe(n_ads)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServeMetrics"]
