"""Flask app of the Label Studio ML backend protocol: /health, /setup, /predict, /webhook, /metrics.

Handlers validate, delegate and answer JSON; they never touch tensors. Every failure is a
JSON body ``{"status": <code>, "detail": "<sentence>"}`` (Label Studio shows the text).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.config import Settings
from backend.labeling import LabelConfigError, parse_label_config
from backend.metrics import CONTENT_TYPE, Metrics
from backend.predictor import Credentials, InteractiveError, Predictor, model_version_for
from backend.protocol import (
    PredictRequest,
    SetupRequest,
    ValidationError,
    WebhookEvent,
    describe_validation_error,
    project_id,
)
from backend.runtime import ModelRuntime, ModelsNotReady

log = logging.getLogger(__name__)

PredictorFactory = Callable[[Settings, Metrics], Predictor]


def default_predictor_factory(settings: Settings, metrics: Metrics) -> Predictor:
    """Load the configured models and build the caches (runs in the loader thread)."""
    from backend.embedding_cache import EmbeddingCache
    from backend.images import ImageLoader
    from backend.models.registry import load_models

    bundle = load_models(settings)
    cache = EmbeddingCache.from_settings(settings)
    return Predictor(settings, bundle.detector, bundle.segmenter, cache, ImageLoader(settings), metrics)


class ApiError(Exception):
    """An expected failure with an HTTP status and a sentence for the user."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _error(status: int, detail: str) -> tuple[Response, int]:
    return jsonify({"status": status, "detail": detail}), status


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


class BackendState:
    """Per-app state: models, credentials and label configs from /setup, recent webhooks."""

    def __init__(self, settings: Settings, factory: PredictorFactory) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.runtime: ModelRuntime[Predictor] = ModelRuntime(lambda: factory(settings, self.metrics))
        self._lock = threading.Lock()
        self.credentials: dict[str, Credentials] = {}
        self.label_configs: dict[str, str] = {}
        self.webhook_events: deque[dict[str, Any]] = deque(maxlen=100)

    def remember_setup(self, project: str | None, schema: str, creds: Credentials) -> None:
        if project is None:
            return
        with self._lock:
            self.credentials[project] = creds
            self.label_configs[project] = schema

    def credentials_for(self, project: str | None) -> Credentials:
        with self._lock:
            return self.credentials.get(project or "", Credentials())


def create_app(settings: Settings | None = None, predictor_factory: PredictorFactory | None = None) -> Flask:
    """App factory: ``gunicorn 'backend.app:create_app()'`` or the CLI's ``serve``."""
    settings = settings or Settings.from_env()
    state = BackendState(settings, predictor_factory or default_predictor_factory)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024
    app.extensions["backend_state"] = state
    state.runtime.start()

    @app.before_request
    def _start() -> Response | tuple[Response, int] | None:
        g.request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex[:12]
        g.started = time.perf_counter()
        if settings.basic_auth_user and request.endpoint != "health":
            auth = request.authorization
            ok = (
                auth is not None
                and secrets.compare_digest(auth.username or "", settings.basic_auth_user)
                and secrets.compare_digest(auth.password or "", settings.basic_auth_pass)
            )
            if not ok:
                response, status = _error(401, "basic authentication required")
                response.headers["WWW-Authenticate"] = 'Basic realm="grounded-sam-backend"'
                return response, status
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        endpoint = request.endpoint or "unknown"
        state.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        state.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - g.get("started", 0.0))
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        kind = "request" if exc.status < 500 else "model"
        state.metrics.errors.labels(kind=kind).inc()
        log.info("request %s: %s %s", g.get("request_id"), exc.status, exc.detail)
        return _error(exc.status, exc.detail)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        state.metrics.errors.labels(kind="internal").inc()
        log.exception("request %s failed", g.get("request_id"))
        return _error(500, f"internal error ({type(exc).__name__}); request id {g.get('request_id')}")

    @app.get("/health")
    @app.get("/")
    def health() -> Response:
        runtime = state.runtime
        return jsonify(
            {
                "status": "UP",
                "model_class": "GroundedSAM",
                "model_state": runtime.state,
                "error": runtime.error,
                "detector": settings.detector_model,
                "segmenter": settings.segmenter_model,
                "device": settings.device,
            }
        )

    @app.post("/setup")
    def setup() -> Response:
        try:
            body = SetupRequest.model_validate(_json_body())
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from exc
        try:
            project = parse_label_config(body.schema_, settings.label_prompts)
        except LabelConfigError as exc:
            raise ApiError(400, f"unsupported label config: {exc}") from exc
        if state.runtime.state == "error":
            raise ApiError(503, f"models failed to load: {state.runtime.error}")
        state.remember_setup(
            project_id(body.project), body.schema_, Credentials(body.hostname, body.access_token)
        )
        return jsonify({"model_version": model_version_for(settings, project)})

    @app.post("/predict")
    def predict() -> Response:
        try:
            body = PredictRequest.model_validate(_json_body())
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from exc
        project = project_id(body.project)
        label_config = body.label_config or state.label_configs.get(project or "")
        if not label_config:
            raise ApiError(400, "label_config is missing and /setup was not called for this project")
        try:
            predictor = state.runtime.get(settings.model_wait_s)
        except ModelsNotReady as exc:
            raise ApiError(503, str(exc)) from exc
        tasks = [task.model_dump() for task in body.tasks]
        creds = state.credentials_for(project)
        context = body.context
        try:
            if context and context.get("result"):
                if len(tasks) != 1:
                    raise ApiError(400, f"an interactive request must hold exactly one task, got {len(tasks)}")
                results = [predictor.predict_interactive(tasks[0], context, label_config, creds)]
            else:
                results = predictor.predict_tasks(tasks, label_config, creds)
        except LabelConfigError as exc:
            raise ApiError(400, f"unsupported label config: {exc}") from exc
        except InteractiveError as exc:
            raise ApiError(400, f"cannot use this interactive context: {exc}") from exc
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook() -> Response:
        try:
            event = WebhookEvent.model_validate(_json_body())
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from exc
        state.metrics.webhook_events.labels(action=event.action).inc()
        state.webhook_events.append({"action": event.action, "received": time.time()})
        return jsonify({"status": "ok", "action": event.action})

    @app.get("/metrics")
    def metrics() -> Response:
        runtime = state.runtime
        if runtime.load_seconds is not None:
            state.metrics.model_load_seconds.set(runtime.load_seconds)
        if runtime.state == "ready":
            for name, value in runtime.get(0).cache.stats().items():
                state.metrics.embedding_cache.labels(stat=name).set(value)
        return Response(state.metrics.render(), content_type=CONTENT_TYPE)

    return app
