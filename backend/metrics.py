"""Prometheus metrics, one registry per app instance (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The counters the backend exports at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gsb_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gsb_request_seconds", "HTTP request latency by endpoint", ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.tasks = Counter(
            "gsb_tasks", "Tasks predicted, by outcome (ok, error)", ["outcome"], registry=self.registry
        )
        self.errors = Counter(
            "gsb_errors", "Errors by kind (image, model, config, request, internal)", ["kind"],
            registry=self.registry,
        )
        self.regions = Counter(
            "gsb_regions", "Regions returned, by result type", ["type"], registry=self.registry
        )
        self.unmatched_phrases = Counter(
            "gsb_unmatched_phrases",
            "Detector boxes whose text matched no label phrase (dropped, never given a default label)",
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "gsb_webhook_events", "Webhook events received by action", ["action"], registry=self.registry
        )
        self.model_load_seconds = Gauge(
            "gsb_model_load_seconds", "Seconds the models took to load", registry=self.registry
        )
        self.embedding_cache = Gauge(
            "gsb_embedding_cache", "Embedding cache counters (hits, misses, ...)", ["stat"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
