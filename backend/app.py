"""Flask app of the Label Studio ML backend protocol: /health, /setup, /predict, /webhook, /metrics.

Handlers validate, delegate and answer JSON; they never touch tensors. Every failure is a
JSON body ``{"status": <code>, "detail": "<sentence>"}`` (Label Studio shows the text).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.config import ConfigError, Settings
from backend.deferred import BatchContext, DeferredPredictions, budget_deadline, predict_within_budget
from backend.fast_json import OrjsonProvider
from backend.images import load_deadline
from backend.labeling import LabelConfigError, parse_label_config
from backend.logs import install_request_context
from backend.metrics import CONTENT_TYPE, Metrics, webhook_action_label
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

# A caller's X-Request-ID is reused only when it looks like an id: it goes into every log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def default_predictor_factory(settings: Settings, metrics: Metrics) -> Predictor:
    """Load the configured models and build the caches (runs in the loader thread)."""
    from backend.embedding_cache import EmbeddingCache
    from backend.images import ImageLoader
    from backend.models.registry import load_models

    cache = EmbeddingCache.from_settings(settings)  # first: SAM 3's click tracker reads from it
    bundle = load_models(settings, cache)
    return Predictor(
        settings,
        bundle.detector,
        bundle.segmenter,
        cache,
        ImageLoader(settings),
        metrics,
        concept_segmenter=bundle.concept_segmenter,
    )


class ApiError(Exception):
    """An expected failure with an HTTP status and a sentence for the user.

    ``kind`` is its ``gsb_errors_total`` label: ``request`` for other 4xx, ``model`` for 5xx
    unless given.
    """

    def __init__(self, status: int, detail: str, kind: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or ("request" if status < 500 else "model")


def _error(status: int, detail: str) -> tuple[Response, int]:
    return jsonify({"status": status, "detail": detail}), status


def _json_body() -> dict[str, Any]:
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(request.get_data(cache=True)) >= limit:
        # A chunked body has no Content-Length for werkzeug to refuse up front; its stream stops
        # silently at the limit, which would read as truncated JSON. Reaching the limit is all a
        # capped stream can tell, so a body of exactly the limit is refused too.
        raise ApiError(
            413,
            f"the request body reaches MAX_REQUEST_MB={limit // (1024 * 1024)} ({limit} bytes); "
            "send fewer or smaller tasks or raise the limit",
        )
    try:
        body = request.get_json(silent=True)
    except RecursionError as exc:  # the C decoder's depth guard; not a ValueError, so not silenced
        raise ApiError(400, "the request body is nested too deeply") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


@dataclass(frozen=True)
class ProjectSetup:
    """What ``/setup`` told us about a project: its label config, where its images live, and
    its own prediction mode (``extra_params.prediction_mode``), if any."""

    label_config: str | None = None
    credentials: Credentials = field(default_factory=Credentials)
    mode: str | None = None


class BackendState:
    """Per-app state: models, credentials and label configs from /setup, recent webhooks.

    Per-project state is kept for the ``max_projects`` most recently set up projects: project
    ids come from the caller, and Label Studio sends the label config with every /predict
    anyway, so forgetting an old project costs nothing but keeps memory bounded.
    """

    max_projects = 1024

    def __init__(self, settings: Settings, factory: PredictorFactory) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.runtime: ModelRuntime[Predictor] = ModelRuntime(lambda: factory(settings, self.metrics))
        self.deferred = DeferredPredictions.from_settings(settings, self.metrics)  # /predict's overflow
        self._lock = threading.Lock()
        self.setups: OrderedDict[str, ProjectSetup] = OrderedDict()
        self.webhook_events: deque[dict[str, Any]] = deque(maxlen=100)

    def remember_setup(self, project: str | None, setup: ProjectSetup) -> None:
        if project is None:
            return
        with self._lock:
            self.setups[project] = setup
            self.setups.move_to_end(project)
            while len(self.setups) > self.max_projects:
                self.setups.popitem(last=False)

    def setup_for(self, project: str | None) -> ProjectSetup:
        with self._lock:
            return self.setups.get(project or "", ProjectSetup())


def route_info(state: BackendState) -> dict[str, Any]:
    """The pre-annotation route, the model of every role and the device: the loaded ones once
    the models are ready, the configured ones before (``PIPELINE=auto`` is resolved while they load)."""
    if state.runtime.state == "ready":
        from backend.models.loading import resolve_device  # torch is loaded by now

        predictor = state.runtime.get(0)
        device = resolve_device(state.settings.device)  # "auto" -> the device the models run on
        return {"pipeline": predictor.pipeline, "models": predictor.model_ids(), "device": device}
    configured = {"detector": state.settings.detector_model, "segmenter": state.settings.segmenter_model}
    return {"pipeline": state.settings.pipeline, "models": configured}


def create_app(settings: Settings | None = None, predictor_factory: PredictorFactory | None = None) -> Flask:
    """App factory: ``gunicorn 'backend.app:create_app()'`` or the CLI's ``serve``."""
    settings = settings or Settings.from_env()
    state = BackendState(settings, predictor_factory or default_predictor_factory)
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024
    app.extensions["backend_state"] = state
    install_request_context()
    state.runtime.start()

    @app.before_request
    def _start() -> Response | tuple[Response, int] | None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex[:12]
        g.started = time.perf_counter()
        if settings.basic_auth_user and request.endpoint != "health":
            auth = request.authorization
            ok = (
                auth is not None
                and secrets.compare_digest(auth.username or "", settings.basic_auth_user)
                and secrets.compare_digest(auth.password or "", settings.basic_auth_pass)
            )
            if not ok:
                state.metrics.errors.labels(kind="auth").inc()
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
        state.metrics.errors.labels(kind=exc.kind).inc()
        log.info("request %s: %s %s", g.get("request_id"), exc.status, exc.detail)
        return _error(exc.status, exc.detail)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        # werkzeug's own refusals: unknown route, wrong method, body over MAX_REQUEST_MB
        state.metrics.errors.labels(kind="request").inc()
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
        route = route_info(state)  # the loaded models once ready: the sam3 route has no detector
        return jsonify(
            {
                "status": "UP",
                "model_class": "GroundedSAM",
                "model_state": runtime.state,
                "error": runtime.error,
                "detector": route["models"].get("detector"),
                "segmenter": route["models"].get("segmenter"),
                "device": settings.device,
                **route,
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
            raise ApiError(400, f"unsupported label config: {exc}", kind="config") from exc
        if state.runtime.state == "error":
            raise ApiError(503, f"models failed to load: {state.runtime.error}")
        mode = (body.extra_params or {}).get("prediction_mode")
        try:
            version = model_version_for(settings, project, mode)
        except ConfigError as exc:
            raise ApiError(400, f"extra_params: {exc}", kind="config") from exc
        state.remember_setup(
            project_id(body.project),
            ProjectSetup(body.schema_, Credentials(body.hostname, body.access_token), mode),
        )
        return jsonify({"model_version": version, **route_info(state)})

    @app.post("/predict")
    def predict() -> Response:
        raw = _json_body()
        raw_tasks = raw.get("tasks")
        if isinstance(raw_tasks, list) and len(raw_tasks) > settings.max_tasks_per_request:
            raise ApiError(
                413,
                f"{len(raw_tasks)} tasks in one request, over MAX_TASKS_PER_REQUEST="
                f"{settings.max_tasks_per_request}; select fewer tasks or raise the limit",
            )
        try:
            body = PredictRequest.model_validate(raw)
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from exc
        g.task_ids = [task.id for task in body.tasks]
        project_setup = state.setup_for(project_id(body.project))
        label_config = body.label_config or project_setup.label_config
        if not label_config:
            raise ApiError(400, "label_config is missing and /setup was not called for this project")
        try:
            predictor = state.runtime.get(settings.model_wait_s)
        except ModelsNotReady as exc:
            raise ApiError(503, str(exc)) from exc
        tasks = [task.model_dump() for task in body.tasks]
        creds = project_setup.credentials
        context = body.context
        try:
            # Label Studio's batch requests carry context null; any context at all is a click
            # (even an empty one, which parse_context answers with what is missing)
            if context is not None:
                if len(tasks) != 1:
                    raise ApiError(400, f"an interactive request must hold exactly one task, got {len(tasks)}")
                # a click's image download ends with the budget too: Label Studio waits no longer
                with load_deadline(budget_deadline(settings.predict_time_budget_s, g.started)):
                    results = [
                        predictor.predict_interactive(tasks[0], context, label_config, creds, project_id(body.project))
                    ]
            else:
                project = project_id(body.project)
                state.metrics.predict_tasks.observe(len(tasks))
                batch = BatchContext.create(predictor, label_config, creds, project_setup.mode, project)
                results = predict_within_budget(batch, tasks, state.deferred, settings.predict_time_budget_s, g.started)
        except LabelConfigError as exc:
            raise ApiError(400, f"unsupported label config: {exc}", kind="config") from exc
        except InteractiveError as exc:
            raise ApiError(400, f"cannot use this interactive context: {exc}") from exc
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook() -> Response:
        try:
            event = WebhookEvent.model_validate(_json_body())
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from exc
        state.metrics.webhook_events.labels(action=webhook_action_label(event.action)).inc()
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
