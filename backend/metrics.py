"""Prometheus metrics, one registry per app instance (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label Studio's webhook actions (webhooks/models.py) and START_TRAINING. Any other action is
# counted as "other": a label per client-chosen string would grow the registry without bound.
WEBHOOK_ACTIONS = frozenset(
    {
        "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
        "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
        "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
        "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED", "START_TRAINING",
    }
)


def webhook_action_label(action: str) -> str:
    """The ``action`` label of ``gsb_webhook_events_total`` for a received action."""
    return action if action in WEBHOOK_ACTIONS else "other"


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
            "gsb_errors", "Errors by kind (image, model, config, request, auth, internal)", ["kind"],
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
        # How many tasks Label Studio sends per batch /predict: "Retrieve predictions" on a
        # selection is one call for all of it, which the e2e tests rely on to catch results
        # returned out of task order (a call per task could not).
        self.predict_tasks = Histogram(
            "gsb_predict_tasks_per_request",
            "Tasks per batch /predict request (interactive calls carry one task and are not counted)",
            buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "gsb_webhook_events", "Webhook events received by action", ["action"], registry=self.registry
        )
        self.deferred_tasks = Counter(
            "gsb_deferred_tasks",
            "Tasks /predict left past its time budget, by outcome (queued, already_queued, posted, "
            "already_predicted, rejected, failed, dropped, no_credentials, unpostable)",
            ["outcome"],
            registry=self.registry,
        )
        self.deferred_pending = Gauge(
            "gsb_deferred_pending", "Deferred tasks queued or being predicted in the background",
            registry=self.registry,
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
