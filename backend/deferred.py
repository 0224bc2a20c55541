"""``/predict`` within Label Studio's patience: a time budget, and the rest posted from the background.

Why: Label Studio 1.23 sends every selected task still lacking a prediction of the current
``model_version`` in ONE ``/predict`` call and gives up after ``ML_TIMEOUT_PREDICT`` (100 s),
storing nothing of that call; a few hundred tasks on a CPU never fit. So ``/predict`` works to
``PREDICT_TIME_BUDGET_S``: it predicts the tasks in order while the time spent plus the slowest
task so far still fits, and answers the others with items without ``result``, which Label
Studio skips while it stores the rest (ls-protocol.md).

Those *deferred* tasks are finished here, by one daemon thread per app reading a bounded queue,
through the same ``Predictor`` path (same regions, same ``model_version``, batch priority below
clicks through its ``ModelGate``), and posted with ``backend.jobs.post_predictions``, the batch
CLI's path: it asks Label Studio right before posting, so a task never gets two predictions of
one ``model_version`` from it. Posting needs ``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY``;
without them nothing posts deferred tasks and Label Studio asks for them again on the next
*Retrieve predictions*. The queue lives in memory: tasks still in it when the process stops are
asked for again the same way.

No duplicates from Label Studio re-sending a task (a second *Retrieve predictions* while the
background works): a task queued or in flight is neither queued twice nor predicted inline,
since Label Studio would store the inline answer next to the background's post. A task the
background finished less than ``RECENT_S`` ago is handed back to the background too, not
predicted inline: Label Studio may have listed it as lacking a prediction just before the post
landed, and the background checks Label Studio before predicting it again.

The budget also bounds each task's image download (``backend.images.load_deadline``): retries
and back-off of one slow image cannot carry the request past it. The background's lines in the
log carry the request id of the request that deferred the task, and the task's id.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from backend.config import Settings
from backend.images import load_deadline
from backend.jobs import DEFAULT_BACKOFF, Backoff, describe_error, post_predictions
from backend.logs import current_log_context, log_context
from backend.ls_client import LabelStudioClient
from backend.metrics import Metrics
from backend.predictor import Credentials, Predictor

log = logging.getLogger(__name__)

MAX_QUEUED_TASKS = 2000  # two full requests at MAX_TASKS_PER_REQUEST's default
# Longer than Label Studio waits for /predict (100 s by default): an inline answer it stores was
# listed by it at most that long ago.
RECENT_S = 300.0
MAX_RECENT = 10_000

Key = tuple[int, str, int]  # Label Studio project id, model_version, task id

# What a deferred item tells the user (Label Studio logs the items it skips), by outcome.
_NEXT_STEP = {
    "queued": "it is predicted in the background and posted to Label Studio",
    "already_queued": "it is already being predicted in the background and will be posted to Label Studio",
    "no_credentials": "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend to have it posted "
    "in the background; until then, retrieve predictions again",
    "dropped": "the background queue is full; retrieve predictions again later",
    "unpostable": "it cannot be posted (the request names no Label Studio project or task id); "
    "retrieve predictions again",
}


@dataclass(frozen=True)
class BatchContext:
    """What predicting a task of one ``/predict`` request needs; the tasks it defers keep it."""

    predictor: Predictor
    label_config: str
    creds: Credentials
    mode: str | None
    project: str | None  # Label Studio's project id ("12" of "12.1700000000"); None if not sent
    model_version: str

    @classmethod
    def create(
        cls, predictor: Predictor, label_config: str, creds: Credentials, mode: str | None, project: str | None
    ) -> BatchContext:
        """Raises ``LabelConfigError`` for a config the predictor cannot serve, before any task runs."""
        version = predictor.model_version(predictor.project(label_config), mode)
        return cls(predictor, label_config, creds, mode, project, version)

    @property
    def ls_project(self) -> int | None:
        """The project id to post to, when the request named one."""
        return int(self.project) if self.project and self.project.isdigit() else None

    def key(self, task: dict[str, Any]) -> Key | None:
        """The task's identity in the background; None when it cannot be posted."""
        task_id = task.get("id")
        if self.ls_project is None or not isinstance(task_id, int) or isinstance(task_id, bool):
            return None
        return (self.ls_project, self.model_version, task_id)

    def predict(self, task: dict[str, Any]) -> dict[str, Any]:
        """One item through ``Predictor.predict_tasks``: exactly what ``/predict`` computes."""
        return self.predictor.predict_tasks([task], self.label_config, self.creds, self.mode, self.project)[0]


def deferred_item(model_version: str, task_id: Any, outcome: str) -> dict[str, Any]:
    """An item without ``result``: Label Studio skips it and stores the others."""
    message = f"task {task_id} deferred: {_NEXT_STEP[outcome]}"
    return {"model_version": model_version, "deferred": True, "message": message}


class DeferredPredictions:
    """The background half: a bounded queue of deferred tasks, one daemon worker thread (started
    on first use, so after gunicorn's fork), and the bookkeeping that prevents duplicates."""

    def __init__(
        self,
        metrics: Metrics,
        client: LabelStudioClient | None,
        *,
        max_queued: int = MAX_QUEUED_TASKS,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.client = client
        self.backoff = backoff
        self.clock = clock
        # each task with the id of the request that deferred it, for the worker's log lines
        self._queue: queue.Queue[tuple[Key, BatchContext, dict[str, Any], str]] = queue.Queue(maxsize=max_queued)
        self._cond = threading.Condition()
        self._pending: set[Key] = set()  # queued or in flight
        self._recent: OrderedDict[Key, float] = OrderedDict()  # finished, at clock time
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> DeferredPredictions:
        """Posting needs both ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``."""
        client = None
        if settings.label_studio_url and settings.label_studio_api_key:
            client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        return cls(metrics, client)

    def owns(self, batch: BatchContext, task: dict[str, Any]) -> bool:
        """Whether the task is queued, in flight, or finished here less than ``RECENT_S`` ago."""
        key = batch.key(task)
        if key is None:
            return False
        with self._cond:
            finished = self._recent.get(key)
            return key in self._pending or (finished is not None and self.clock() - finished < RECENT_S)

    def submit(self, batch: BatchContext, tasks: Sequence[dict[str, Any]]) -> list[str]:
        """Queue ``tasks`` for the background; returns each task's outcome, in order (``queued``,
        ``already_queued``, ``dropped``, ``no_credentials`` or ``unpostable``)."""
        if self.client is None:
            outcomes = ["no_credentials"] * len(tasks)
        else:
            request_id = current_log_context()[0]
            with self._cond:
                outcomes = [self._enqueue(batch, task, request_id) for task in tasks]
                self.metrics.deferred_pending.set(len(self._pending))
                if "queued" in outcomes and (self._thread is None or not self._thread.is_alive()):
                    self._thread = threading.Thread(target=self._work, name="deferred-predictions", daemon=True)
                    self._thread.start()
        self._report(batch, tasks, outcomes)
        return outcomes

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or in flight; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    def _enqueue(self, batch: BatchContext, task: dict[str, Any], request_id: str) -> str:
        key = batch.key(task)
        if key is None:
            return "unpostable"
        if key in self._pending:
            return "already_queued"
        try:
            self._queue.put_nowait((key, batch, task, request_id))
        except queue.Full:
            return "dropped"
        self._pending.add(key)
        return "queued"

    def _report(self, batch: BatchContext, tasks: Sequence[dict[str, Any]], outcomes: list[str]) -> None:
        ids: dict[str, list[Any]] = {}
        for task, outcome in zip(tasks, outcomes, strict=True):
            ids.setdefault(outcome, []).append(task.get("id"))
        for outcome, count in Counter(outcomes).items():
            self.metrics.deferred_tasks.labels(outcome=outcome).inc(count)
        where = f"project {batch.project}, model_version {batch.model_version}"
        listed = {outcome: ", ".join(map(str, found)) for outcome, found in ids.items()}
        if "queued" in listed:
            log.info("deferred tasks %s (%s): queued for the background", listed["queued"], where)
        if "already_queued" in listed:
            log.info("deferred tasks %s (%s): already queued, not queued twice", listed["already_queued"], where)
        if "no_credentials" in listed:
            log.warning(
                "deferred tasks %s (%s): not posted, LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not both set; "
                "Label Studio asks for them again on the next Retrieve predictions",
                listed["no_credentials"], where,
            )
        if "dropped" in listed:
            log.warning("deferred tasks %s (%s): dropped, the background queue is full", listed["dropped"], where)
        if "unpostable" in listed:
            log.warning("deferred tasks %s (%s): cannot be posted without a project and task id",
                        listed["unpostable"], where)

    def _work(self) -> None:
        while True:
            key, batch, task, request_id = self._queue.get()
            with log_context(request_id, [key[2]]):  # no Flask request here to name them
                outcome = self._finish(key, batch, task)
            self.metrics.deferred_tasks.labels(outcome=outcome).inc()
            with self._cond:
                self._pending.discard(key)
                self._recent[key] = self.clock()
                self._recent.move_to_end(key)
                while len(self._recent) > MAX_RECENT:
                    self._recent.popitem(last=False)
                self.metrics.deferred_pending.set(len(self._pending))
                self._cond.notify_all()

    def _finish(self, key: Key, batch: BatchContext, task: dict[str, Any]) -> str:
        """Predict and post one task: ``posted``, ``already_predicted``, ``rejected`` or ``failed``."""
        assert self.client is not None  # only queued with a client
        client = self.client
        project, version, task_id = key
        where = f"deferred task {task_id} (project {project}, model_version {version})"
        try:
            # Asked first, so a task predicted meanwhile (re-sent, or by the batch CLI) costs no model time.
            stored = self.backoff.run(lambda: client.ids_with_model_version(project, version, [task_id]), where)
            if task_id in stored:
                log.info("%s: already predicted in Label Studio, skipped", where)
                return "already_predicted"
            item = batch.predict(task)
            if "result" not in item:
                log.warning("%s failed, not posted: %s", where, item.get("error"))
                return "failed"
            outcome = post_predictions(client, project, {task_id: item}, version, backoff=self.backoff)
        except (ApiError, httpx.HTTPError, ValueError) as exc:  # Label Studio unreachable or refusing
            log.warning("%s failed: %s", where, describe_error(exc))
            return "failed"
        except Exception:  # a bug; the worker must outlive any one task
            log.exception("%s failed", where)
            return "failed"
        if outcome.rejected:
            log.warning("%s: refused by Label Studio: %s", where, outcome.rejected[task_id])
            return "rejected"
        if outcome.already_predicted:
            log.info("%s: already predicted in Label Studio, not posted", where)
            return "already_predicted"
        log.info("%s: posted", where)
        return "posted"


def budget_deadline(
    budget_s: float, started: float, clock: Callable[[], float] = time.perf_counter
) -> float | None:
    """The ``time.monotonic()`` at which a request that arrived at ``started`` (on ``clock``)
    runs out of ``budget_s`` (0: no budget, None): what image loads are bounded by."""
    if budget_s <= 0:
        return None
    return time.monotonic() + budget_s - (clock() - started)


def predict_within_budget(
    batch: BatchContext,
    tasks: Sequence[dict[str, Any]],
    deferred: DeferredPredictions,
    budget_s: float,
    started: float,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """Items in task order: predicted ones, and deferred items (no ``result``) for the others.

    Before each task, the request stops predicting when the time since ``started`` (its arrival,
    on ``clock``) plus its slowest task so far would pass ``budget_s`` (0: no budget); tasks the
    background owns are never predicted here. The tasks left go to ``deferred``. A task that
    started in time still fails, with an error naming the budget, if its image is not
    downloaded by the budget's end.
    """
    deadline = budget_deadline(budget_s, started, clock)
    items: list[dict[str, Any] | None] = []
    slowest = 0.0
    out_of_time = False
    for index, task in enumerate(tasks):
        if not out_of_time and budget_s > 0 and clock() - started + slowest > budget_s:
            out_of_time = True
            log.info(
                "time budget PREDICT_TIME_BUDGET_S=%g s: stopping after %.1f s at task %d of %d (slowest %.1f s)",
                budget_s, clock() - started, index + 1, len(tasks), slowest,
            )
        if out_of_time or deferred.owns(batch, task):
            items.append(None)
            continue
        begun = clock()
        with load_deadline(deadline):
            items.append(batch.predict(task))
        slowest = max(slowest, clock() - begun)
    left = [task for task, item in zip(tasks, items, strict=True) if item is None]
    outcomes = iter(deferred.submit(batch, left) if left else [])
    return [
        item if item is not None else deferred_item(batch.model_version, task.get("id"), next(outcomes))
        for task, item in zip(tasks, items, strict=True)
    ]
