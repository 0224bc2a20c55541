"""``/predict``'s time budget and the background that posts what it deferred (backend/deferred.py).

The budget loop runs on an injected clock that the fake segmenter advances by one second per
image, so which tasks fit is exact; Label Studio is an in-memory fake of the two calls the
background makes. Only the HTTP test uses real time, with wide margins.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from flask import Flask, g
from label_studio_sdk.errors import BadRequestError
from PIL import Image

from backend.config import ConfigError, Settings
from backend.deferred import RECENT_S, BatchContext, DeferredPredictions, predict_within_budget
from backend.jobs import Backoff
from backend.labeling import parse_label_config
from backend.logs import install_request_context
from backend.metrics import Metrics
from backend.models.base import ImageEmbedding
from backend.predictor import Credentials, Predictor, model_version_for
from tests.conftest import CONFIG_ALL_OUTPUTS, build_predictor, data_uri, image_task
from tests.fakes import BoxDetector, BoxFillSegmenter

CAT_BOX = ((4.0, 4.0, 20.0, 16.0), 0.8)
NO_WAIT = Backoff(attempts=2, first_s=0.0)
TASK_S = 1.0  # what one image costs on the fake clock


class FakeClock:
    """Seconds that pass only when told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class TickingSegmenter(BoxFillSegmenter):
    """Each image embedding costs ``TASK_S`` on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def embed(self, image: Image.Image) -> ImageEmbedding:
        self.clock.advance(TASK_S)
        return super().embed(image)


class FakeLabelStudio:
    """The two calls of ``LabelStudioClient`` that the background makes, on in-memory predictions.

    ``hold`` (when set) stops the first ``ids_with_model_version`` call until it is set again, with
    ``entered`` telling that the worker got there; ``down`` makes every call fail like a dead
    server; ``refuse`` lists tasks whose predictions it answers 400 to.
    """

    def __init__(self) -> None:
        self.predictions: list[dict[str, Any]] = []
        self.refuse: set[int] = set()
        self.down = False
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def ids_with_model_version(self, project: int, version: str, ids: Sequence[int] | None = None) -> set[int]:
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.entered.set()
            assert hold.wait(10), "the test never released the worker"
        if self.down:
            raise httpx.ConnectError("connection refused")
        stored = {p["task"] for p in self.predictions if p["model_version"] == version}
        return stored if ids is None else stored & set(ids)

    def import_predictions(self, project: int, items: Sequence[dict[str, Any]]) -> int:
        if any(item["task"] in self.refuse for item in items):
            raise BadRequestError(body={"detail": "Validation error", "validation_errors": ["bad result"]})
        self.predictions.extend({**item, "project": project} for item in items)
        return len(items)

    def count(self, task_id: int) -> int:
        return sum(p["task"] == task_id for p in self.predictions)


def _tasks(ids: Sequence[int]) -> list[dict[str, Any]]:
    return [image_task(i, 40 + i, 30) for i in ids]  # distinct sizes: distinct images, no cache hits


def _outcomes(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for sample in metrics.deferred_tasks.collect()[0].samples
        if sample.name.endswith("_total")
    }


def _without_ids(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in region.items() if k != "id"} for region in result]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def predictor(clock: FakeClock) -> Predictor:
    return build_predictor(Settings(), BoxDetector({"cat": [CAT_BOX]}), TickingSegmenter(clock), Metrics())


def _batch(predictor: Predictor, project: str | None = "12") -> BatchContext:
    return BatchContext.create(predictor, CONFIG_ALL_OUTPUTS, Credentials(), None, project)


def _background(predictor: Predictor, ls: FakeLabelStudio | None, clock: FakeClock, **kwargs: Any):
    return DeferredPredictions(predictor.metrics, ls, backoff=NO_WAIT, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_budget_keeps_the_tasks_that_fit_and_defers_the_rest_in_order(
    predictor: Predictor, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    batch = _batch(predictor)
    deferred = _background(predictor, None, clock)  # no Label Studio URL / key
    items = predict_within_budget(batch, _tasks([1, 2, 3, 4, 5]), deferred, budget_s=2.5, started=0.0, clock=clock)

    # 0 s + 0 -> task 1; 1 s + 1 s slowest -> task 2; 2 s + 1 s > 2.5 s -> stop
    assert [("result" in item) for item in items] == [True, True, False, False, False]
    assert all(item["result"] and item["model_version"] == batch.model_version for item in items[:2])
    for task_id, item in zip([3, 4, 5], items[2:], strict=True):
        assert item["deferred"] is True and item["model_version"] == batch.model_version
        assert item["message"].startswith(f"task {task_id} deferred:") and "LABEL_STUDIO_API_KEY" in item["message"]
    assert predictor.segmenter.embed_calls == 2
    assert _outcomes(predictor.metrics) == {"no_credentials": 3.0}
    assert "3, 4, 5" in caplog.text and "not both set" in caplog.text


def test_time_already_spent_before_the_first_task_defers_everything(predictor: Predictor, clock: FakeClock) -> None:
    clock.advance(80.0)  # e.g. the request waited for the models to load
    items = predict_within_budget(
        _batch(predictor), _tasks([1, 2]), _background(predictor, None, clock), budget_s=75.0, started=0.0, clock=clock
    )
    assert [item.get("deferred") for item in items] == [True, True]
    assert predictor.segmenter.embed_calls == 0


def test_budget_zero_predicts_everything_inline(predictor: Predictor, clock: FakeClock) -> None:
    items = predict_within_budget(
        _batch(predictor), _tasks(range(1, 7)), _background(predictor, FakeLabelStudio(), clock),
        budget_s=0.0, started=0.0, clock=clock,
    )
    assert all(item["result"] for item in items) and clock.now == 6 * TASK_S
    assert _outcomes(predictor.metrics) == {}


def test_deferred_tasks_are_posted_once_with_the_inline_regions(predictor: Predictor, clock: FakeClock) -> None:
    ls = FakeLabelStudio()
    deferred = _background(predictor, ls, clock)
    batch = _batch(predictor)
    tasks = _tasks([1, 2, 3, 4, 5])
    items = predict_within_budget(batch, tasks, deferred, budget_s=2.5, started=0.0, clock=clock)
    assert [("result" in item) for item in items] == [True, True, False, False, False]
    assert "predicted in the background" in items[2]["message"]
    assert deferred.wait_idle(30)

    assert {task_id: ls.count(task_id) for task_id in range(1, 6)} == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    inline = predictor.predict_tasks(tasks[2:], CONFIG_ALL_OUTPUTS, Credentials())
    for posted, expected in zip(sorted(ls.predictions, key=lambda p: p["task"]), inline, strict=True):
        assert posted["project"] == 12 and posted["model_version"] == batch.model_version
        assert _without_ids(posted["result"]) == _without_ids(expected["result"])
        assert posted["score"] == expected["score"]
    assert _outcomes(predictor.metrics) == {"queued": 3.0, "posted": 3.0}
    assert predictor.metrics.registry.get_sample_value("gsb_deferred_pending") == 0


def test_a_resent_task_is_neither_queued_twice_nor_predicted_inline(predictor: Predictor, clock: FakeClock) -> None:
    ls = FakeLabelStudio()
    ls.hold = threading.Event()
    release = ls.hold
    deferred = _background(predictor, ls, clock)
    batch = _batch(predictor)
    predict_within_budget(batch, _tasks([1, 2, 3, 4]), deferred, budget_s=1.5, started=0.0, clock=clock)
    assert ls.entered.wait(10)  # task 2 in flight, 3 and 4 queued
    embedded = predictor.segmenter.embed_calls

    # Label Studio sends 2, 3, 4 again (a second "Retrieve predictions"), with time to spare.
    again = predict_within_budget(batch, _tasks([2, 3, 4, 5]), deferred, budget_s=1000.0, started=0.0, clock=clock)
    assert [item.get("deferred", False) for item in again] == [True, True, True, False]
    assert "already being predicted" in again[0]["message"]
    assert predictor.segmenter.embed_calls == embedded + 1  # only task 5 ran inline
    release.set()
    assert deferred.wait_idle(30)
    assert [ls.count(task_id) for task_id in (1, 2, 3, 4, 5)] == [0, 1, 1, 1, 0]
    assert _outcomes(predictor.metrics) == {"queued": 3.0, "already_queued": 3.0, "posted": 3.0}

    # Just finished: re-sent tasks go back to the background, which finds them stored, unpredicted.
    detected = len(predictor.detector.calls)
    third = predict_within_budget(batch, _tasks([3, 4]), deferred, budget_s=1000.0, started=0.0, clock=clock)
    assert all(item["deferred"] for item in third)
    assert deferred.wait_idle(30)
    assert len(predictor.detector.calls) == detected
    assert [ls.count(task_id) for task_id in (3, 4)] == [1, 1]
    assert _outcomes(predictor.metrics)["already_predicted"] == 2.0

    # Long after: Label Studio would not re-send a stored task; one it does re-send runs inline.
    clock.advance(RECENT_S + 1)
    [late] = predict_within_budget(batch, _tasks([3]), deferred, budget_s=1000.0, started=clock(), clock=clock)
    assert late["result"]


def test_failures_are_counted_and_never_posted(
    predictor: Predictor, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ls = FakeLabelStudio()
    ls.refuse = {3}
    deferred = _background(predictor, ls, clock)
    batch = _batch(predictor)
    broken = {"id": 2, "data": {"image": data_uri(b"this is not an image")}}
    # budget 0.5 s: task 1 runs (nothing measured yet), then 1 s + 1 s > 0.5 s
    tasks = [*_tasks([1]), broken, *_tasks([3, 4])]
    items = predict_within_budget(batch, tasks, deferred, budget_s=0.5, started=0.0, clock=clock)
    assert [("result" in item) for item in items] == [True, False, False, False]
    assert deferred.wait_idle(30)
    assert [ls.count(task_id) for task_id in (2, 3, 4)] == [0, 0, 1]
    assert "deferred task 2 (project 12" in caplog.text and "failed, not posted" in caplog.text
    assert "deferred task 3 (project 12" in caplog.text and "bad result" in caplog.text
    assert _outcomes(predictor.metrics) == {"queued": 3.0, "failed": 1.0, "rejected": 1.0, "posted": 1.0}

    ls.down = True  # Label Studio unreachable through every retry
    predict_within_budget(batch, _tasks([5, 6]), deferred, budget_s=0.5, started=clock(), clock=clock)
    assert deferred.wait_idle(30)
    assert _outcomes(predictor.metrics)["failed"] == 2.0  # task 6; task 5 ran inline
    assert ls.count(6) == 0


def test_the_workers_log_lines_carry_the_deferring_request_id_and_their_task(
    predictor: Predictor, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker has no Flask request to read them from, yet its lines must trace back to the
    request that deferred the task (``X-Request-ID``) and name the task."""
    install_request_context()  # what create_app does
    ls = FakeLabelStudio()
    ls.refuse = {3}
    deferred = _background(predictor, ls, clock)
    with caplog.at_level(logging.INFO), Flask(__name__).test_request_context():
        g.request_id, g.task_ids = "ls-4711", [1, 2, 3]
        predict_within_budget(_batch(predictor), _tasks([1, 2, 3]), deferred, budget_s=0.5, started=0.0, clock=clock)
        assert deferred.wait_idle(30)
    background = [r for r in caplog.records if r.threadName == "deferred-predictions"]
    assert {r.getMessage().split(" (")[0]: r.task_ids for r in background} == {
        "deferred task 2": "2", "deferred task 3": "3"
    }
    assert {r.request_id for r in background} == {"ls-4711"}
    assert "refused by Label Studio" in background[-1].getMessage()


def test_a_full_queue_drops_and_requests_without_ids_cannot_post(predictor: Predictor, clock: FakeClock) -> None:
    ls = FakeLabelStudio()
    ls.hold = release = threading.Event()
    deferred = _background(predictor, ls, clock, max_queued=1)
    batch = _batch(predictor)
    assert deferred.submit(batch, _tasks([1])) == ["queued"]
    assert ls.entered.wait(10)  # task 1 in flight: the queue is empty again
    assert deferred.submit(batch, [*_tasks([2, 3]), {"id": "x", "data": {}}]) == ["queued", "dropped", "unpostable"]
    assert deferred.submit(_batch(predictor, project=None), _tasks([4])) == ["unpostable"]
    release.set()
    assert deferred.wait_idle(30)
    assert [ls.count(task_id) for task_id in (1, 2, 3, 4)] == [1, 1, 0, 0]
    assert _outcomes(predictor.metrics) == {"queued": 2.0, "dropped": 1.0, "unpostable": 2.0, "posted": 2.0}


def test_budget_setting_is_parsed_checked_and_not_part_of_model_version() -> None:
    assert Settings().predict_time_budget_s == 75.0
    assert Settings.from_env({"PREDICT_TIME_BUDGET_S": "0"}).predict_time_budget_s == 0.0
    for raw in ("-1", "nan", "soon"):
        with pytest.raises(ConfigError, match="PREDICT_TIME_BUDGET_S"):
            Settings.from_env({"PREDICT_TIME_BUDGET_S": raw})
    project = parse_label_config(CONFIG_ALL_OUTPUTS)
    assert model_version_for(Settings(predict_time_budget_s=5), project) == model_version_for(Settings(), project)


def test_predict_over_http_answers_in_time_and_posts_the_rest(make_client) -> None:
    """Real time: each image takes 0.6 s and the budget is 1 s, so after the first task the
    request stops (0.6 s spent + 0.6 s slowest > 1 s) whatever the machine's speed."""
    settings = Settings(predict_time_budget_s=1.0)
    client, app = make_client(settings, BoxDetector({"cat": [CAT_BOX]}), BoxFillSegmenter(embed_delay_s=0.6))
    state = app.extensions["backend_state"]
    ls = FakeLabelStudio()
    state.deferred = DeferredPredictions(state.metrics, ls, backoff=NO_WAIT)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while client.get("/health").json["model_state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)

    body = {"tasks": _tasks([1, 2, 3, 4]), "project": "12.1700000000", "label_config": CONFIG_ALL_OUTPUTS}
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json["results"]
    assert [("result" in item) for item in results] == [True, False, False, False]
    assert [item["message"].split(" deferred")[0] for item in results[1:]] == ["task 2", "task 3", "task 4"]
    assert state.deferred.wait_idle(30)
    assert [ls.count(task_id) for task_id in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert {p["project"] for p in ls.predictions} == {12}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'gsb_deferred_tasks_total{outcome="posted"} 3.0' in metrics
    assert "gsb_deferred_pending 0.0" in metrics
