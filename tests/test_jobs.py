"""Batch pre-annotation logic against an in-memory Label Studio (no server): planning and skip
logic, batching, idempotent posting through lost answers and refusals, the SIGINT path, the
factory hook and the embedding disk cache; the RQ path with a real redis-server and an
in-process worker."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.errors import BadRequestError
from rq import Queue
from rq.job import Job, JobStatus

from backend import jobs
from backend.config import ConfigError, Settings
from backend.labeling import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.metrics import Metrics
from backend.predictor import Predictor, model_version_for
from tests.batch_predictor import CAT_BOX, CAT_SCORE, FACTORY, fake_predictor
from tests.conftest import data_uri, png_bytes
from tests.redis_server import redis_server

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="rect" toName="image"><Label value="cat"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>"""
NO_WAIT = jobs.Backoff(attempts=4, first_s=0.0)
IMAGE = data_uri(png_bytes(32, 24))
BROKEN = "data:image/png;base64,bm90IGFuIGltYWdl"  # "not an image"


class FakeLabelStudio:
    """The calls ``backend.jobs`` makes of ``LabelStudioClient``, on in-memory tasks and
    predictions. ``fail_import`` entries run before each import (raise to fail it, store first
    to lose the answer); ``after_import`` runs after each stored import; ``fail_reads`` entries
    (name of a read method -> errors) are raised by the next calls of that method, one each;
    ``extra_params`` holds one entry per connected ML backend."""

    def __init__(self, images: dict[int, str], config: str = CONFIG) -> None:
        self.config = config
        self.data = {task_id: {"image": image} for task_id, image in images.items()}
        self.predictions: list[dict[str, Any]] = []
        self.fail_import: list[Callable[[Sequence[dict[str, Any]]], None]] = []
        self.after_import: Callable[[], None] = lambda: None
        self.refuse: set[int] = set()  # tasks whose predictions Label Studio answers 400 to
        self.import_calls = 0
        self.fail_reads: dict[str, list[Exception]] = {}
        self.extra_params: list[Any] = []

    def _read(self, method: str) -> None:
        if self.fail_reads.get(method):
            raise self.fail_reads[method].pop(0)

    def get_label_config(self, project: int) -> str:
        self._read("get_label_config")
        return self.config

    def ml_backend_extra_params(self, project: int) -> list[Any]:
        self._read("ml_backend_extra_params")
        return list(self.extra_params)

    def task_ids(self, project: int, *, view: int | None = None, ids: Sequence[int] | None = None) -> list[int]:
        self._read("task_ids")
        return [i for i in self.data if ids is None or i in ids]

    def tasks(self, project: int, ids: Sequence[int]) -> list[dict[str, Any]]:
        return [{"id": i, "data": dict(self.data[i])} for i in ids if i in self.data]

    def ids_with_model_version(self, project: int, version: str, ids: Sequence[int] | None = None) -> set[int]:
        self._read("ids_with_model_version")
        return {
            p["task"] for p in self.predictions if p["model_version"] == version and (ids is None or p["task"] in ids)
        }

    def import_predictions(self, project: int, items: Sequence[dict[str, Any]]) -> int:
        self.import_calls += 1
        if self.fail_import:
            self.fail_import.pop(0)(items)
        if any(item["task"] in self.refuse for item in items):
            raise BadRequestError(body={"detail": "Validation error", "validation_errors": ["bad result"]})
        self.predictions.extend(dict(item) for item in items)
        self.after_import()
        return len(items)

    def delete_predictions(self, task_ids: Sequence[int], version: str) -> int:
        before = len(self.predictions)
        self.predictions = [
            p for p in self.predictions if not (p["task"] in task_ids and p["model_version"] == version)
        ]
        return before - len(self.predictions)

    def per_task(self, version: str) -> dict[int, int]:
        counts = {i: 0 for i in self.data}
        for p in self.predictions:
            if p["model_version"] == version:
                counts[p["task"]] += 1
        return counts


def _predictor(settings: Settings | None = None) -> Predictor:
    return fake_predictor(settings or Settings(), Metrics())


def _version(settings: Settings | None = None) -> str:
    return model_version_for(settings or Settings(), parse_label_config(CONFIG))


def _item(version: str) -> dict[str, Any]:
    return {"result": [], "score": 0.5, "model_version": version}


def _lose_answer(ls: FakeLabelStudio) -> Callable[[Sequence[dict[str, Any]]], None]:
    """Store the import, then fail as if the answer never arrived."""

    def fail(items: Sequence[dict[str, Any]]) -> None:
        ls.predictions.extend(dict(item) for item in items)
        raise httpx.ReadTimeout("answer lost")

    return fail


def _raise(exc: Exception) -> Callable[[Sequence[dict[str, Any]]], None]:
    def fail(items: Sequence[dict[str, Any]]) -> None:
        raise exc

    return fail


def _run(ls: FakeLabelStudio, predictor: Predictor, batch_size: int = 3, **plan_args: Any) -> jobs.RunSummary:
    plan = jobs.make_plan(ls, 1, predictor.settings, backoff=NO_WAIT, **plan_args)
    return jobs.run_batches(ls, predictor, plan, batch_size=batch_size, stop=threading.Event(), backoff=NO_WAIT)


# --------------------------------------------------------------------------- planning and batching


def test_batches_splits_in_order_and_refuses_zero() -> None:
    assert list(jobs.batches([1, 2, 3, 4, 5, 6, 7], 3)) == [[1, 2, 3], [4, 5, 6], [7]]
    assert list(jobs.batches([], 3)) == []
    with pytest.raises(ValueError):
        list(jobs.batches([1], 0))


def test_plan_skips_only_the_current_model_version() -> None:
    ls = FakeLabelStudio({i: IMAGE for i in range(1, 7)})
    version = _version()
    ls.predictions = [{"task": 2, "model_version": version}, {"task": 3, "model_version": "older-model"}]

    plan = jobs.make_plan(ls, 1, Settings())
    assert plan.model_version == version
    assert (plan.in_scope, plan.already_predicted, plan.todo) == (6, 1, [1, 3, 4, 5, 6])

    limited = jobs.make_plan(ls, 1, Settings(), limit=2)
    assert (limited.todo, limited.deferred) == ([1, 3], 3)

    chosen = jobs.make_plan(ls, 1, Settings(), task_ids=[5, 2, 5, 99])
    assert (chosen.todo, chosen.already_predicted, chosen.not_found) == ([5], 1, [99])
    start = chosen.start_summary()  # an id that is not in the project is a failure: exit 1
    assert (start.skipped, start.failed, start.exit_code) == (1, {99: "task 99: not in project 1"}, 1)

    assert jobs.make_plan(ls, 1, Settings(), overwrite=True).todo == [1, 2, 3, 4, 5, 6]
    # Other thresholds are another model_version: nothing is skipped then.
    assert jobs.make_plan(ls, 1, Settings(box_threshold=0.5)).todo == [1, 2, 3, 4, 5, 6]


def test_plan_retries_label_studio_outages_like_posting() -> None:
    ls = FakeLabelStudio({1: IMAGE, 2: IMAGE})
    ls.fail_reads = {
        method: [ApiError(status_code=503, body="restarting"), httpx.ReadTimeout("slow")]
        for method in ("get_label_config", "ml_backend_extra_params", "task_ids", "ids_with_model_version")
    }
    plan = jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT)
    assert plan.todo == [1, 2] and not any(ls.fail_reads.values())

    ls.fail_reads = {"task_ids": [ApiError(status_code=403, body="forbidden")]}  # not transient: no retry
    with pytest.raises(ApiError):
        jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT)


def test_client_reads_the_extra_params_of_the_projects_ml_backends() -> None:
    def label_studio(request: httpx.Request) -> httpx.Response:
        assert (request.url.path, request.url.params["project"]) == ("/api/ml/", "7")
        return httpx.Response(
            200,
            json=[
                {"id": 1, "project": 7, "url": "http://sam:9090", "extra_params": {"prediction_mode": "everything"}},
                {"id": 2, "project": 7, "url": "http://other:9090", "extra_params": ""},
            ],
        )

    client = LabelStudioClient(
        "http://label-studio.test", "key", httpx_client=httpx.Client(transport=httpx.MockTransport(label_studio))
    )
    assert client.ml_backend_extra_params(7) == [{"prediction_mode": "everything"}, ""]


def test_plan_and_run_use_the_prediction_mode_of_the_projects_connection() -> None:
    ls = FakeLabelStudio({i: IMAGE for i in range(1, 5)})
    predictor = _predictor()
    everything = model_version_for(Settings(), parse_label_config(CONFIG), "everything")
    assert everything != _version()

    # No ML backend connected, or one without a mode: the deployment's PREDICTION_MODE.
    assert jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT).model_version == _version()
    ls.extra_params = ["", None, {"other": 1}]  # Label Studio sends "" for an empty form
    assert jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT).mode is None

    ls.extra_params = ["", {"prediction_mode": " Everything"}]  # normalised as /setup does
    plan = jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT)
    assert (plan.mode, plan.model_version) == ("everything", everything)
    summary = jobs.run_batches(ls, predictor, plan, batch_size=3, stop=threading.Event(), backoff=NO_WAIT)
    assert (summary.done, summary.exit_code) == (4, 0)
    assert ls.per_task(everything) == {1: 1, 2: 1, 3: 1, 4: 1}
    grounded = predictor.predict_tasks(ls.tasks(1, [1]), CONFIG, jobs._credentials(predictor.settings))[0]
    assert ls.predictions[0]["result"] != grounded["result"]  # the point grid's regions, not the detector's

    # The RQ job gets the mode from the plan (see the queue test) and predicts in it.
    ls.predictions = []
    result = jobs.process_batch(ls, predictor, 1, CONFIG, [1, 2], everything, mode="everything", backoff=NO_WAIT)
    assert result.done == [1, 2]

    for bad, message in (
        ({"prediction_mode": "sideways"}, "sideways"),
        ({"prediction_mode": 3}, "prediction_mode must be text"),
        ("not json params", "extra_params"),
    ):
        ls.extra_params = [bad]
        with pytest.raises(ConfigError, match=message):
            jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT)
    ls.extra_params = [{"prediction_mode": "everything"}, {"prediction_mode": "grounded"}]
    with pytest.raises(ConfigError, match="different prediction modes"):
        jobs.make_plan(ls, 1, Settings(), backoff=NO_WAIT)


# --------------------------------------------------------------------------- runs


def test_run_posts_every_good_task_once_reports_failures_and_second_run_posts_nothing() -> None:
    ls = FakeLabelStudio({i: (BROKEN if i in (3, 6) else IMAGE) for i in range(1, 9)})
    predictor = _predictor()
    version = predictor.model_version(predictor.project(CONFIG))

    first = _run(ls, predictor)
    assert (first.done, first.skipped, sorted(first.failed)) == (6, 0, [3, 6])
    assert all(reason.startswith(f"task {i}:") for i, reason in first.failed.items())
    assert first.exit_code == 1
    assert ls.per_task(version) == {1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0, 7: 1, 8: 1}
    stored = ls.predictions[0]
    [region] = stored["result"]
    assert stored["score"] == region["score"] == pytest.approx(CAT_SCORE * 0.9)  # x segmenter's IoU score
    x0, y0, x1, y1 = CAT_BOX
    assert region["value"]["rectanglelabels"] == ["cat"]
    assert region["value"]["x"] == pytest.approx(100 * x0 / 32)
    assert region["value"]["width"] == pytest.approx(100 * (x1 - x0) / 32)
    assert region["value"]["height"] == pytest.approx(100 * (y1 - y0) / 24)

    before = list(ls.predictions)
    second = _run(ls, predictor)
    assert (second.done, second.skipped, sorted(second.failed)) == (0, 6, [3, 6])  # failed: tried again
    assert ls.predictions == before

    ls.data[3]["image"] = ls.data[6]["image"] = IMAGE  # fixed images: the next run completes
    third = _run(ls, predictor)
    assert (third.done, third.skipped, third.failed, third.exit_code) == (2, 6, {}, 0)
    assert set(ls.per_task(version).values()) == {1}

    replaced = _run(ls, predictor, overwrite=True)  # predicts everything again, still one each
    assert (replaced.done, replaced.skipped, replaced.exit_code) == (8, 0, 0)
    assert set(ls.per_task(version).values()) == {1}


def test_sigint_stops_after_the_batch_in_hand_and_rerun_completes() -> None:
    ls = FakeLabelStudio({i: IMAGE for i in range(1, 8)})
    predictor = _predictor()
    version = predictor.model_version(predictor.project(CONFIG))
    ls.after_import = lambda: os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after batch 1 posted
    notified = []

    with jobs.stop_on_sigint(lambda: notified.append(True)) as stop:
        plan = jobs.make_plan(ls, 1, predictor.settings)
        summary = jobs.run_batches(ls, predictor, plan, batch_size=3, stop=stop, backoff=NO_WAIT)

    assert summary.interrupted and summary.exit_code == jobs.EXIT_INTERRUPTED and notified == [True]
    assert summary.done == 3 and ls.import_calls == 1  # one whole batch, nothing of the next
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    ls.after_import = lambda: None
    rerun = _run(ls, predictor)
    assert (rerun.done, rerun.skipped, rerun.exit_code) == (4, 3, 0)
    assert set(ls.per_task(version).values()) == {1}


def test_second_sigint_raises_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), jobs.stop_on_sigint() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)


def test_run_stops_on_a_lasting_outage_and_keeps_what_was_posted() -> None:
    ls = FakeLabelStudio({i: IMAGE for i in range(1, 8)})
    down = ApiError(status_code=503, body="maintenance")
    ls.fail_import = [lambda items: None] + [_raise(down)] * NO_WAIT.attempts
    summary = _run(ls, _predictor())
    assert summary.done == 3 and summary.exit_code == 1
    assert summary.error is not None and "503" in summary.error


def test_rerun_of_a_partly_posted_job_posts_each_task_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed during its job had posted some of the chunk's tasks; RQ re-runs the job."""
    version = _version()

    # Posted before the re-run starts: skipped before the models even run.
    ls = FakeLabelStudio({i: IMAGE for i in range(1, 5)})
    ls.predictions = [_item(version) | {"task": i} for i in (1, 2)]
    predictor = _predictor()
    monkeypatch.setattr(jobs, "_worker_context", jobs._WorkerContext(predictor, ls))
    result = jobs.BatchResult.from_dict(jobs.preannotate_chunk(1, [1, 2, 3, 4], version))
    assert (sorted(result.done), sorted(result.skipped), result.failed) == ([3, 4], [1, 2], {})
    assert ls.per_task(version) == {1: 1, 2: 1, 3: 1, 4: 1} and len(predictor.detector.calls) == 2

    # The dead worker's POST lands while the re-run predicts (it was in flight, or the worker
    # was only cut off from Redis): only the check right before posting can see it.
    class LateLanding(FakeLabelStudio):
        def tasks(self, project: int, ids: Sequence[int]) -> list[dict[str, Any]]:
            fetched = super().tasks(project, ids)
            self.predictions.extend(_item(version) | {"task": i} for i in (1, 2))
            return fetched

    ls = LateLanding({i: IMAGE for i in range(1, 5)})
    monkeypatch.setattr(jobs, "_worker_context", jobs._WorkerContext(_predictor(), ls))
    result = jobs.BatchResult.from_dict(jobs.preannotate_chunk(1, [1, 2, 3, 4], version))
    assert (sorted(result.done), sorted(result.skipped), result.failed) == ([3, 4], [1, 2], {})
    assert ls.per_task(version) == {1: 1, 2: 1, 3: 1, 4: 1} and ls.import_calls == 1


def test_run_refuses_a_model_version_other_than_planned() -> None:
    ls = FakeLabelStudio({1: IMAGE})
    with pytest.raises(ValueError, match="model_version"):
        jobs.process_batch(ls, _predictor(Settings(box_threshold=0.5)), 1, CONFIG, [1], _version(), backoff=NO_WAIT)
    assert ls.predictions == []


# --------------------------------------------------------------------------- posting


def test_post_after_a_lost_answer_does_not_duplicate() -> None:
    ls = FakeLabelStudio({1: IMAGE, 2: IMAGE})
    ls.fail_import = [_lose_answer(ls)]
    outcome = jobs.post_predictions(ls, 1, {1: _item("v"), 2: _item("v")}, "v", backoff=NO_WAIT)
    assert sorted(outcome.posted) == [1, 2] and outcome.already_predicted == []
    assert ls.per_task("v") == {1: 1, 2: 1} and ls.import_calls == 1


def test_post_retries_transient_errors_and_not_others() -> None:
    ls = FakeLabelStudio({1: IMAGE})
    ls.fail_import = [_raise(ApiError(status_code=502, body="bad gateway")), _raise(httpx.ConnectError("refused"))]
    assert jobs.post_predictions(ls, 1, {1: _item("v")}, "v", backoff=NO_WAIT).posted == [1]
    assert ls.import_calls == 3 and ls.per_task("v") == {1: 1}

    ls = FakeLabelStudio({1: IMAGE})
    ls.fail_import = [_raise(ApiError(status_code=403, body="forbidden"))]
    with pytest.raises(ApiError):
        jobs.post_predictions(ls, 1, {1: _item("v")}, "v", backoff=NO_WAIT)
    assert ls.import_calls == 1


def test_post_names_the_tasks_label_studio_refuses_and_stores_the_rest() -> None:
    ls = FakeLabelStudio({1: IMAGE, 2: IMAGE, 3: IMAGE})
    ls.refuse = {2}
    outcome = jobs.post_predictions(ls, 1, {i: _item("v") for i in (1, 2, 3)}, "v", backoff=NO_WAIT)
    assert outcome.posted == [1, 3]
    assert list(outcome.rejected) == [2] and "bad result" in outcome.rejected[2]
    assert ls.per_task("v") == {1: 1, 2: 0, 3: 1}


def test_post_after_a_partly_stored_refusal_does_not_duplicate() -> None:
    """Label Studio stores big imports in slices and may refuse a later slice."""
    ls = FakeLabelStudio({1: IMAGE, 2: IMAGE, 3: IMAGE})

    def store_first_then_refuse(items: Sequence[dict[str, Any]]) -> None:
        ls.predictions.append(dict(items[0]))
        raise BadRequestError(body={"detail": "Validation error"})

    ls.fail_import = [store_first_then_refuse]
    outcome = jobs.post_predictions(ls, 1, {i: _item("v") for i in (1, 2, 3)}, "v", backoff=NO_WAIT)
    assert sorted(outcome.posted) == [1, 2, 3] and outcome.rejected == {}
    assert ls.per_task("v") == {1: 1, 2: 1, 3: 1}


def test_post_skips_tasks_that_hold_the_version_and_replace_swaps_them() -> None:
    ls = FakeLabelStudio({1: IMAGE, 2: IMAGE})
    ls.predictions = [{"task": 1, "model_version": "v", "result": "old"}, {"task": 1, "model_version": "w"}]
    outcome = jobs.post_predictions(ls, 1, {1: _item("v"), 2: _item("v")}, "v", backoff=NO_WAIT)
    assert (outcome.posted, outcome.already_predicted) == ([2], [1])

    replaced = jobs.post_predictions(ls, 1, {1: _item("v")}, "v", replace=True, backoff=NO_WAIT)
    assert replaced.posted == [1]
    mine = [p for p in ls.predictions if p["task"] == 1 and p["model_version"] == "v"]
    assert len(mine) == 1 and mine[0]["result"] == []
    assert any(p["model_version"] == "w" for p in ls.predictions)  # other versions stay


def test_post_refuses_error_items_and_foreign_versions() -> None:
    ls = FakeLabelStudio({1: IMAGE})
    with pytest.raises(ValueError, match="result"):
        jobs.post_predictions(ls, 1, {1: {"error": "boom", "model_version": "v"}}, "v")
    with pytest.raises(ValueError, match="model_version"):
        jobs.post_predictions(ls, 1, {1: _item("w")}, "v")
    assert ls.import_calls == 0


# --------------------------------------------------------------------------- models


def test_factory_hook_and_embedding_disk_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(jobs.PREDICTOR_FACTORY_ENV, FACTORY)
    settings = Settings(embedding_cache_dir=str(tmp_path / "embeddings"))
    ls = FakeLabelStudio({1: data_uri(png_bytes(32, 24)), 2: data_uri(png_bytes(30, 24))})
    first = jobs.build_predictor(settings)
    assert first.segmenter.model_id == "test/box-fill-segmenter"
    jobs.process_batch(ls, first, 1, CONFIG, [1, 2], _version(settings), backoff=NO_WAIT)
    assert first.segmenter.embed_calls == 2
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == 2

    # A new process (new memory tier) on the same directory starts warm: no encoder run.
    second = jobs.build_predictor(settings)
    jobs.process_batch(ls, second, 1, CONFIG, [1, 2], _version(settings), overwrite=True, backoff=NO_WAIT)
    assert second.segmenter.embed_calls == 0 and second.cache.disk_hits == 2


def test_factory_hook_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.app import default_predictor_factory

    monkeypatch.delenv(jobs.PREDICTOR_FACTORY_ENV, raising=False)
    assert jobs.load_predictor_factory() is default_predictor_factory
    for spec in ("no_colon", "tests.batch_predictor:missing", "no.such.module:f"):
        monkeypatch.setenv(jobs.PREDICTOR_FACTORY_ENV, spec)
        with pytest.raises(ConfigError, match=jobs.PREDICTOR_FACTORY_ENV):
            jobs.load_predictor_factory()


# --------------------------------------------------------------------------- queue (real redis-server)


def test_queue_jobs_run_once_and_a_second_call_attaches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ls = FakeLabelStudio({i: (BROKEN if i == 4 else IMAGE) for i in range(1, 8)})
    predictor = _predictor()
    monkeypatch.setattr(jobs, "_worker_context", jobs._WorkerContext(predictor, ls))
    with redis_server(tmp_path) as url:
        queue = jobs.open_queue(url)
        plan = jobs.make_plan(ls, 1, predictor.settings)
        attached, new = jobs.enqueue_plan(queue, plan, batch_size=3)
        assert attached == [] and [jobs.job_task_ids(job) for job in new] == [[1, 2, 3], [4, 5, 6], [7]]

        again_attached, again_new = jobs.enqueue_plan(queue, plan, batch_size=3)
        assert again_new == [] and sorted(job.id for job in again_attached) == sorted(job.id for job in new)

        worker = jobs.ModelWorker([queue.name], connection=queue.connection, job_monitoring_interval=1)
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert worker.work(burst=True)  # in this process: installs its own signal handlers
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        summary = jobs.follow(queue, new, stop=threading.Event(), poll_s=0.05)

        assert (summary.done, list(summary.failed), summary.exit_code) == (6, [4], 1)
        assert ls.per_task(plan.model_version) == {1: 1, 2: 1, 3: 1, 4: 0, 5: 1, 6: 1, 7: 1}
        assert jobs.active_jobs(queue, 1, plan.model_version) == []  # all over: the record is pruned


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """An RQ worker run in this process installs its own SIGINT / SIGTERM handlers."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_failed_job_is_rerun_after_its_interval_by_the_workers_scheduler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ls = FakeLabelStudio({i: IMAGE for i in range(1, 4)})
    ls.extra_params = [{"prediction_mode": "everything"}]
    predictor = _predictor()
    monkeypatch.setattr(jobs, "_worker_context", jobs._WorkerContext(predictor, ls))
    # RQ's command channel (not used here) polls every 60 s, and closing it can wait for the poll
    monkeypatch.setattr(jobs.ModelWorker, "subscribe", lambda self: None)
    with redis_server(tmp_path) as url:
        queue = jobs.open_queue(url)
        plan = jobs.make_plan(ls, 1, predictor.settings, backoff=NO_WAIT)
        [job] = jobs.enqueue_plan(queue, plan, batch_size=3)[1]
        assert job.kwargs["mode"] == "everything"  # the worker predicts in the project's mode

        # Label Studio refuses the first run; the job is parked for the first interval, not re-run.
        ls.fail_reads = {"get_label_config": [ApiError(status_code=403, body="token expired")]}
        worker = jobs.ModelWorker([queue.name], connection=queue.connection, job_monitoring_interval=1)
        with _keep_signal_handlers():
            worker.work(burst=True)
        assert job.get_status() == JobStatus.SCHEDULED and ls.predictions == []
        delay = queue.scheduled_job_registry.get_scheduled_time(job) - datetime.now(timezone.utc)
        assert timedelta(seconds=jobs.RETRY_INTERVALS_S[0] - 5) < delay <= timedelta(seconds=jobs.RETRY_INTERVALS_S[0])

        # Once due, the scheduler that `grounded-sam-backend worker` runs puts it back on the queue.
        queue.scheduled_job_registry.schedule(job, datetime.now(timezone.utc) - timedelta(seconds=1))
        with _keep_signal_handlers():
            assert jobs.run_worker(url, predictor.settings, burst=True)
        job.refresh()
        assert job.get_status() == JobStatus.FINISHED and job.retries_left == len(jobs.RETRY_INTERVALS_S) - 1
        assert ls.per_task(plan.model_version) == {1: 1, 2: 1, 3: 1}


def test_follow_reports_a_job_that_failed_for_good(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        queue = Queue("t", connection=jobs.open_queue(url).connection)
        job = queue.enqueue(jobs.preannotate_chunk, kwargs={"project": 1, "task_ids": [5, 6], "model_version": "v"})
        job.set_status(JobStatus.FAILED)
        summary = jobs.follow(queue, [Job.fetch(job.id, connection=queue.connection)], stop=threading.Event())
        assert sorted(summary.failed) == [5, 6] and job.id in summary.failed[5]
