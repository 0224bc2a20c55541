"""Batch pre-annotation of a whole Label Studio project, in one process or on RQ workers.

One path from task ids to stored predictions, shared by ``grounded-sam-backend preannotate``,
the RQ workers and anything else that posts predictions through the API:

1. ``make_plan`` reads the project's prediction mode from its ML backend connection (the
   extra params Label Studio hands to ``/setup``), lists the ids in scope (the project, a Data
   Manager view, or given ids) and drops those already holding a prediction of the current
   ``model_version``. So a second run does nothing, an interrupted run resumes, and failed
   tasks (never posted) are tried again. Its Label Studio calls are retried like posting.
2. ``process_batch`` fetches the batch's task data, runs ``Predictor.predict_tasks`` in the
   plan's mode (the ``/predict`` pipeline: same regions, same ``model_version``) and hands the
   good items to ``post_predictions``.
3. ``post_predictions`` is idempotent: right before posting it asks Label Studio which of the
   tasks already hold this ``model_version`` and posts only the others, all in one request.
   A transient failure (5xx, 429, timeout, dropped connection) repeats check-and-post with
   exponential backoff, so a POST that Label Studio stored although the client never saw the
   answer (a timeout, a killed worker) is not stored twice.

Scale-out: ``enqueue_plan`` turns the plan into RQ jobs of one batch each
(``preannotate_chunk``), re-run after ``RETRY_INTERVALS_S`` when they fail; ``run_worker`` runs
them in a ``ModelWorker`` that loads the models once per process, with RQ's scheduler (which
puts those delayed re-runs back on the queue); ``follow`` aggregates the jobs' results for
``preannotate --wait``.

``GSB_PREDICTOR_FACTORY=module:function`` replaces the model loading of both, and of ``serve``
(tests point it at fake models; an extension can plug in its own). The function takes
``(Settings, Metrics)`` and returns a ``Predictor``, like ``backend.app.default_predictor_factory``,
the default.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.errors import BadRequestError
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry, SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.worker import WorkerStatus

from backend.config import ConfigError, Settings
from backend.labeling import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.metrics import Metrics
from backend.pipelines.everything import check_mode
from backend.predictor import Credentials, Predictor, model_version_for
from backend.protocol import parse_extra_params

if TYPE_CHECKING:
    from backend.app import PredictorFactory

log = logging.getLogger(__name__)

T = TypeVar("T")

PREDICTOR_FACTORY_ENV = "GSB_PREDICTOR_FACTORY"
QUEUE_NAME = "grounded-sam-preannotate"
# Results and failures stay readable this long, for --wait clients that attach late.
RESULT_TTL_S = 7 * 24 * 3600
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"
# Delays before RQ re-runs a failed job (one re-run per entry). Each run already retried Label
# Studio's transient errors for about 15 s (``DEFAULT_BACKOFF``): an outage that outlasts that
# is given minutes to end, not three immediate re-runs that fail the same way.
RETRY_INTERVALS_S = (30, 120, 300)


# --------------------------------------------------------------------------- models


def load_predictor_factory() -> PredictorFactory:
    """The function that loads models into a ``Predictor``: ``GSB_PREDICTOR_FACTORY`` when set
    (a testing and extension hook, read here only), else the server's own factory."""
    spec = os.environ.get(PREDICTOR_FACTORY_ENV, "").strip()
    if not spec:
        from backend.app import default_predictor_factory

        return default_predictor_factory
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{PREDICTOR_FACTORY_ENV}={spec!r} must look like 'package.module:function'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{PREDICTOR_FACTORY_ENV}={spec!r} cannot be loaded: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{PREDICTOR_FACTORY_ENV}={spec!r} is not callable")
    return factory


def build_predictor(settings: Settings) -> Predictor:
    """Models and caches as the server builds them (the embedding cache's disk tier included,
    so pre-annotated images are warm for the annotator's first click)."""
    return load_predictor_factory()(settings, Metrics())


# --------------------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: Label Studio overloaded or restarting (408, 429, 5xx), or the network."""
    if isinstance(exc, ApiError):
        return exc.status_code is not None and (exc.status_code >= 500 or exc.status_code in (408, 429))
    return isinstance(exc, httpx.TransportError)  # timeouts, refused and dropped connections


def describe_error(exc: BaseException) -> str:
    """One line for logs and summaries; Label Studio's own reason for API errors."""
    if isinstance(exc, ApiError):
        body = exc.body
        if isinstance(body, dict):
            body = body.get("validation_errors") or body.get("detail") or body
        return f"Label Studio answered {exc.status_code}: {body}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Backoff:
    """Up to ``attempts`` tries of an action, sleeping ``first_s``, twice that, ... at most
    ``max_s`` between them; only transient errors are retried."""

    attempts: int = 5
    first_s: float = 1.0
    max_s: float = 30.0

    def run(self, action: Callable[[], T], what: str) -> T:
        attempt = 1
        while True:
            try:
                return action()
            except Exception as exc:
                if attempt >= self.attempts or not is_transient(exc):
                    raise
                delay = min(self.first_s * 2 ** (attempt - 1), self.max_s)
                log.warning(
                    "%s failed (%s); try %d of %d in %.1f s",
                    what, describe_error(exc), attempt + 1, self.attempts, delay,
                )
                time.sleep(delay)
                attempt += 1


DEFAULT_BACKOFF = Backoff()


# --------------------------------------------------------------------------- posting


@dataclass
class PostOutcome:
    """What ``post_predictions`` did with each task."""

    posted: list[int] = field(default_factory=list)
    already_predicted: list[int] = field(default_factory=list)  # held this model_version: skipped
    rejected: dict[int, str] = field(default_factory=dict)  # Label Studio refused it (400), why


def post_predictions(
    client: LabelStudioClient,
    project: int,
    predictions: Mapping[int, Mapping[str, Any]],
    model_version: str,
    *,
    replace: bool = False,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> PostOutcome:
    """Store ``task id -> prediction item`` (``result``, ``score``, as ``Predictor`` makes
    them) in Label Studio, at most one prediction of ``model_version`` per task.

    Without ``replace``, tasks that already hold a prediction of ``model_version`` are left
    alone (checked right before posting, again on every retry). With ``replace``, their
    predictions of ``model_version`` are deleted first (other versions stay), so a retry also
    ends with exactly one. Raises ``ValueError`` for an item without ``result`` or of another
    model_version, and the last error when Label Studio stays unreachable.
    """
    payloads: dict[int, dict[str, Any]] = {}
    for task_id, item in predictions.items():
        if "result" not in item:
            raise ValueError(f"task {task_id}: an item without 'result' is not a prediction: {item}")
        if item.get("model_version", model_version) != model_version:
            raise ValueError(f"task {task_id}: item of model_version {item['model_version']}, not {model_version}")
        payloads[int(task_id)] = {
            "task": int(task_id),
            "result": item["result"],
            "score": item.get("score"),
            "model_version": model_version,
        }
    if not payloads:
        return PostOutcome()
    sent: set[int] = set()  # posted by an attempt whose answer may have been lost
    return backoff.run(
        lambda: _post_checked(client, project, payloads, model_version, replace, sent),
        f"posting {len(payloads)} predictions to project {project}",
    )


def _post_checked(
    client: LabelStudioClient,
    project: int,
    payloads: dict[int, dict[str, Any]],
    model_version: str,
    replace: bool,
    sent: set[int],
) -> PostOutcome:
    """One attempt: check (or delete), then post what is missing. Tasks found stored that an
    earlier attempt sent count as posted: that attempt's answer was lost, not its request."""
    ids = list(payloads)
    if replace:
        client.delete_predictions(ids, model_version)
        stored: set[int] = set()
    else:
        stored = client.ids_with_model_version(project, model_version, ids)
    outcome = PostOutcome(
        posted=[i for i in ids if i in stored and i in sent],
        already_predicted=[i for i in ids if i in stored and i not in sent],
    )
    fresh = [i for i in ids if i not in stored]
    if not fresh:
        return outcome
    sent.update(fresh)
    try:
        client.import_predictions(project, [payloads[i] for i in fresh])
        outcome.posted += fresh
        return outcome
    except BadRequestError as exc:
        if len(fresh) == 1:
            outcome.rejected[fresh[0]] = f"task {fresh[0]}: {describe_error(exc)}"
            return outcome
    # Post one by one to name the refused tasks. Label Studio validates and stores in slices
    # of 500, so a refused request of more may have stored its first slices: check again.
    stored = client.ids_with_model_version(project, model_version, fresh)
    outcome.posted += [i for i in fresh if i in stored]
    for task_id in (i for i in fresh if i not in stored):
        try:
            client.import_predictions(project, [payloads[task_id]])
            outcome.posted.append(task_id)
        except BadRequestError as exc:
            outcome.rejected[task_id] = f"task {task_id}: {describe_error(exc)}"
    return outcome


# --------------------------------------------------------------------------- planning


def project_mode(client: LabelStudioClient, project: int, backoff: Backoff = DEFAULT_BACKOFF) -> str | None:
    """The prediction mode the project's ML backend connection sets in its extra params
    (``{"prediction_mode": "everything"}``), or None for the deployment's PREDICTION_MODE (no
    backend connected, or none sets a mode).

    The server learns it from ``/setup``, so each connection's extra params are read as
    ``/setup`` reads them (``parse_extra_params``, ``check_mode``): the run predicts in the
    mode, and under the ``model_version``, that ``/predict`` uses. Raises ``ConfigError`` for
    a mode the server refuses too, or for connections that set different modes (which one is
    this backend cannot be told from here).
    """
    connections = backoff.run(
        lambda: client.ml_backend_extra_params(project), f"listing project {project}'s ML backends"
    )
    modes: set[str] = set()
    for extra_params in connections:
        try:
            mode = (parse_extra_params(extra_params) or {}).get("prediction_mode")
            if mode is not None:
                modes.add(check_mode(mode))
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"project {project}'s ML backend extra_params: {exc}") from exc
    if len(modes) > 1:
        raise ConfigError(
            f"project {project}'s ML backends set different prediction modes ({', '.join(sorted(modes))}); "
            "keep one prediction_mode in their extra params"
        )
    return modes.pop() if modes else None


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before any model is loaded."""

    project: int
    label_config: str
    model_version: str
    in_scope: int  # tasks selected: the project's, the view's, or the given ids found
    already_predicted: int  # of those, holding a prediction of model_version (skipped)
    todo: list[int]  # to predict, in Label Studio's order
    deferred: int = 0  # left for a later run by --limit
    not_found: list[int] = field(default_factory=list)  # given ids that are not in the project
    overwrite: bool = False  # replace predictions of model_version instead of skipping them
    mode: str | None = None  # the project's prediction mode; None: the deployment's PREDICTION_MODE

    def start_summary(self) -> RunSummary:
        """Totals before any batch: the skipped tasks, and given ids not found as failures."""
        missing = {i: f"task {i}: not in project {self.project}" for i in self.not_found}
        return RunSummary(skipped=self.already_predicted, failed=missing)


def make_plan(
    client: LabelStudioClient,
    project: int,
    settings: Settings,
    *,
    view: int | None = None,
    task_ids: Sequence[int] | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> Plan:
    """List the tasks in scope and keep those still lacking a prediction of the current
    ``model_version`` (all of them with ``overwrite``), at most ``limit``. The version is the
    one ``/predict`` gives this project: its label config and its connection's prediction mode
    (``project_mode``). Label Studio's transient errors are retried with ``backoff``, as when
    posting: a restart during planning should not end a run that would resume after it.

    Raises ``LabelConfigError`` when the project's config has nothing this backend can output,
    ``ConfigError`` when its connection's extra params name no valid mode.
    """
    label_config = backoff.run(lambda: client.get_label_config(project), f"reading project {project}'s label config")
    mode = project_mode(client, project, backoff)
    model_version = model_version_for(settings, parse_label_config(label_config, settings.label_prompts), mode)
    wanted = list(dict.fromkeys(task_ids)) if task_ids is not None else None
    ids = backoff.run(lambda: client.task_ids(project, view=view, ids=wanted), f"listing project {project}'s tasks")
    have: set[int] = set()
    if not overwrite:
        have = backoff.run(
            lambda: client.ids_with_model_version(project, model_version),
            f"listing project {project}'s tasks predicted as {model_version}",
        )
    remaining = [i for i in ids if i not in have]
    todo = remaining if limit is None else remaining[:limit]
    return Plan(
        project=project,
        label_config=label_config,
        model_version=model_version,
        in_scope=len(ids),
        already_predicted=len(ids) - len(remaining),
        todo=todo,
        deferred=len(remaining) - len(todo),
        not_found=sorted(set(wanted) - set(ids)) if wanted is not None else [],
        overwrite=overwrite,
        mode=mode,
    )


def batches(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    """``ids`` in consecutive lists of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(ids), size):
        yield list(ids[start:start + size])


# --------------------------------------------------------------------------- one batch


@dataclass
class BatchResult:
    """Per-task outcome of one batch; ``failed`` maps task id to a reason."""

    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for an RQ job result (readable whatever the code version of the reader)."""
        return {"done": self.done, "skipped": self.skipped, "failed": {str(k): v for k, v in self.failed.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchResult:
        return cls(
            done=[int(i) for i in data.get("done", [])],
            skipped=[int(i) for i in data.get("skipped", [])],
            failed={int(k): str(v) for k, v in data.get("failed", {}).items()},
        )


def process_batch(
    client: LabelStudioClient,
    predictor: Predictor,
    project: int,
    label_config: str,
    task_ids: Sequence[int],
    model_version: str,
    *,
    overwrite: bool = False,
    mode: str | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> BatchResult:
    """Predict (in the project's ``mode``, see ``project_mode``) and post one batch. Tasks
    predicted meanwhile (by another run, or by a worker that died after posting) are skipped
    before the models run; tasks deleted meanwhile are skipped too. Raises ``ValueError`` when
    this process computes another ``model_version`` than the plan's (other models, thresholds
    or label prompts than the planning process)."""
    label = f"batch of {len(task_ids)} tasks of project {project}"
    predicted: set[int] = set()
    if not overwrite:
        predicted = backoff.run(lambda: client.ids_with_model_version(project, model_version, task_ids), label)
    wanted = [i for i in task_ids if i not in predicted]
    tasks = backoff.run(lambda: client.tasks(project, wanted), label) if wanted else []
    found = {task["id"] for task in tasks}
    result = BatchResult(skipped=[i for i in task_ids if i not in found])
    if not tasks:
        return result
    items = predictor.predict_tasks(tasks, label_config, _credentials(predictor.settings), mode)
    versions = {item.get("model_version") for item in items}
    if versions != {model_version}:
        raise ValueError(
            f"this process predicts as model_version {', '.join(map(str, versions))} but the run was "
            f"planned as {model_version}: its models, thresholds or LABEL_PROMPTS differ"
        )
    good: dict[int, dict[str, Any]] = {}
    for task, item in zip(tasks, items, strict=True):
        if "error" in item:
            result.failed[task["id"]] = item["error"]
        else:
            good[task["id"]] = item
    outcome = post_predictions(client, project, good, model_version, replace=overwrite, backoff=backoff)
    result.done = outcome.posted
    result.skipped += outcome.already_predicted
    result.failed.update(outcome.rejected)
    return result


def _credentials(settings: Settings) -> Credentials:
    """Images of Label Studio tasks are fetched with the same URL and key as the API calls."""
    return Credentials(settings.label_studio_url or None, settings.label_studio_api_key or None)


# --------------------------------------------------------------------------- one process


@dataclass
class RunSummary:
    """Totals of a run, over batches or over queue jobs."""

    done: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    interrupted: bool = False
    error: str | None = None  # why the run stopped early, when it did

    def add(self, result: BatchResult) -> None:
        self.done += len(result.done)
        self.skipped += len(result.skipped)
        self.failed.update(result.failed)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 1 if self.failed or self.error else 0


def run_batches(
    client: LabelStudioClient,
    predictor: Predictor,
    plan: Plan,
    *,
    batch_size: int,
    stop: threading.Event,
    on_batch: Callable[[BatchResult], None] = lambda result: None,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> RunSummary:
    """Process ``plan.todo`` batch by batch in this process, checking ``stop`` between batches
    (a batch in hand is always finished and posted). A batch that raises (Label Studio gone
    for longer than the backoff) ends the run with ``error`` set: what was posted stays, and
    the next run resumes after it."""
    summary = plan.start_summary()
    for batch in batches(plan.todo, batch_size):
        if stop.is_set():
            summary.interrupted = True
            break
        try:
            result = process_batch(
                client, predictor, plan.project, plan.label_config, batch, plan.model_version,
                overwrite=plan.overwrite, mode=plan.mode, backoff=backoff,
            )
        except Exception as exc:
            log.exception("batch of tasks %s..%s failed", batch[0], batch[-1])
            summary.error = describe_error(exc)
            break
        summary.add(result)
        on_batch(result)
    return summary


@contextmanager
def stop_on_sigint(notify: Callable[[], None] = lambda: None) -> Iterator[threading.Event]:
    """Within the block the first SIGINT (Ctrl-C) sets the yielded event instead of raising,
    so a loop can finish the batch in hand and stop; ``notify`` tells the user. A second
    SIGINT raises ``KeyboardInterrupt`` at once; even then nothing is stored twice, because
    every post checks what Label Studio already holds. Main thread only (Python's signals)."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        notify()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- RQ: enqueue and follow


def open_queue(redis_url: str, name: str = QUEUE_NAME) -> Queue:
    return Queue(name, connection=Redis.from_url(redis_url))


def _run_key(project: int, model_version: str) -> str:
    """Redis set of the job ids enqueued for one project and model_version."""
    return f"grounded-sam:preannotate:{project}:{model_version}:jobs"


_FAILED = {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}  # for good: retries are QUEUED again
_OVER = _FAILED | {JobStatus.FINISHED}


def active_jobs(queue: Queue, project: int, model_version: str) -> list[Job]:
    """Jobs of earlier ``preannotate --queue`` calls for this project and version that are
    still queued or running (the others are dropped from the record)."""
    key = _run_key(project, model_version)
    ids = sorted(member.decode() for member in queue.connection.smembers(key))
    active, done = [], []
    for job_id, job in zip(ids, Job.fetch_many(ids, connection=queue.connection), strict=True):
        if job is not None and job.get_status(refresh=False) not in _OVER:
            active.append(job)
        else:
            done.append(job_id)
    if done:
        queue.connection.srem(key, *done)
    return active


def enqueue_plan(
    queue: Queue,
    plan: Plan,
    *,
    batch_size: int,
    job_timeout_s: int = 3600,
    retry_intervals_s: Sequence[int] = RETRY_INTERVALS_S,
) -> tuple[list[Job], list[Job]]:
    """Enqueue ``plan.todo`` as jobs of ``batch_size`` tasks; returns ``(attached, new)``.

    Tasks already covered by an active job of an earlier call (same project and version) are
    not enqueued again: that job is returned in ``attached`` so the caller can follow it.
    A job that raised or whose worker died (found by the registry cleanup, see ``follow``) is
    re-run once per entry of ``retry_intervals_s``, that many seconds later: RQ parks it in the
    queue's scheduled registry, and a worker's scheduler (``run_worker``) puts it back on the
    queue when due (an empty ``retry_intervals_s``: no re-run). Re-runs are harmless because
    posting is checked.
    """
    attached = active_jobs(queue, plan.project, plan.model_version)
    covered = {int(i) for job in attached for i in job.kwargs.get("task_ids", [])}
    todo = [i for i in plan.todo if i not in covered]
    datas = [
        Queue.prepare_data(
            preannotate_chunk,
            kwargs={
                "project": plan.project,
                "task_ids": chunk,
                "model_version": plan.model_version,
                "overwrite": plan.overwrite,
                "mode": plan.mode,
            },
            timeout=job_timeout_s,
            retry=Retry(max=len(retry_intervals_s), interval=list(retry_intervals_s)) if retry_intervals_s else None,
            result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S,
            description=f"pre-annotate project {plan.project} tasks {chunk[0]}..{chunk[-1]} ({len(chunk)})",
        )
        for chunk in batches(todo, batch_size)
    ]
    new = queue.enqueue_many(datas) if datas else []
    if new:
        key = _run_key(plan.project, plan.model_version)
        queue.connection.sadd(key, *(job.id for job in new))
        queue.connection.expire(key, RESULT_TTL_S)
    return attached, new


def requeue_abandoned(queue: Queue) -> None:
    """Let RQ re-queue jobs whose worker died: ``StartedJobRegistry.cleanup`` retries a job
    whose heartbeat expired (if it has retries left). Workers do this only between jobs and
    every few minutes; a waiting client doing it too gets a dead worker's chunk re-run within
    about a heartbeat TTL. Takes RQ's maintenance lock so a job is not re-queued twice."""
    if queue.acquire_maintenance_lock():
        try:
            clean_registries(queue)
        finally:
            queue.release_maintenance_lock()


def job_task_ids(job: Job) -> list[int]:
    return [int(i) for i in job.kwargs.get("task_ids", [])]


def follow(
    queue: Queue,
    jobs: Sequence[Job],
    *,
    stop: threading.Event,
    summary: RunSummary | None = None,
    on_result: Callable[[BatchResult], None] = lambda result: None,
    poll_s: float = 1.0,
    cleanup_s: float = 5.0,
) -> RunSummary:
    """Wait for ``jobs`` and add up their results (into ``summary`` when given); a job that
    failed for good counts all its tasks as failed with the job's last error. Returns early,
    ``interrupted``, when ``stop`` is set (the jobs keep running on the workers)."""
    pending = {job.id: job_task_ids(job) for job in jobs}
    summary = RunSummary() if summary is None else summary
    last_cleanup = float("-inf")
    while pending:
        if time.monotonic() - last_cleanup >= cleanup_s:
            requeue_abandoned(queue)
            last_cleanup = time.monotonic()
        ids = list(pending)
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=queue.connection), strict=True):
            result = _job_outcome(job_id, job, pending[job_id])
            if result is not None:
                del pending[job_id]
                summary.add(result)
                on_result(result)
        # Each poll reads every pending job: with thousands, poll less often (about 500 a second).
        if pending and stop.wait(max(poll_s, len(pending) / 500)):
            summary.interrupted = True
            break
    return summary


def _job_outcome(job_id: str, job: Job | None, task_ids: list[int]) -> BatchResult | None:
    """The job's result once it is over; None while it is queued or running."""
    if job is None:
        reason = f"job {job_id} is no longer in Redis (expired or deleted)"
    else:
        status = job.get_status(refresh=False)
        if status == JobStatus.FINISHED:
            return BatchResult.from_dict(job.return_value() or {})
        if status not in _FAILED:
            return None  # queued, running, or waiting for a retry
        latest = job.latest_result()
        error = (latest.exc_string or "").strip().splitlines() if latest else []
        reason = f"job {job_id} {status.value}: {error[-1] if error else 'no details'}"
    return BatchResult(failed={i: f"task {i}: {reason}" for i in task_ids})


# --------------------------------------------------------------------------- RQ: the worker side


@dataclass(frozen=True)
class _WorkerContext:
    predictor: Predictor
    client: LabelStudioClient


_worker_lock = threading.Lock()
_worker_context: _WorkerContext | None = None


def init_worker(settings: Settings | None = None) -> _WorkerContext:
    """This process's models and Label Studio client, built on first use and kept: a worker
    loads the models once, not per job. ``settings`` default to the environment (a plain
    ``rq worker`` process); Label Studio's URL and key come from them, never from the job."""
    global _worker_context
    with _worker_lock:
        if _worker_context is None:
            settings = settings or Settings.from_env()
            client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
            _worker_context = _WorkerContext(build_predictor(settings), client)
        return _worker_context


def preannotate_chunk(
    project: int, task_ids: list[int], model_version: str, overwrite: bool = False, mode: str | None = None
) -> dict[str, Any]:
    """RQ job: pre-annotate ``task_ids`` of ``project`` in the planned ``mode`` (see
    ``process_batch``); returns ``BatchResult.as_dict()``. Safe to run twice: posting is checked."""
    context = init_worker()
    label_config = DEFAULT_BACKOFF.run(
        lambda: context.client.get_label_config(project), f"reading project {project}'s label config"
    )
    result = process_batch(
        context.client, context.predictor, project, label_config, task_ids, model_version,
        overwrite=overwrite, mode=mode,
    )
    log.info(
        "project %s: %d done, %d skipped, %d failed", project, len(result.done), len(result.skipped), len(result.failed)
    )
    return result.as_dict()


class ModelWorker(SimpleWorker):
    """An RQ worker for model jobs: runs each job in the worker's own process (``SimpleWorker``:
    no fork per job, so models loaded once stay loaded, and CUDA, which does not survive a
    fork, works) and keeps the job's heartbeat going from a thread while it runs.

    ``SimpleWorker`` alone sends one heartbeat per job, valid for the job's whole timeout plus
    60 s, so a chunk whose worker was killed would wait that long before RQ re-runs it. Here
    the heartbeat is renewed every ``job_monitoring_interval`` seconds and lasts three of them.
    """

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * int(self.job_monitoring_interval)

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beats = threading.Thread(target=self._beat, args=(job, execution, done), name="heartbeat", daemon=True)
        beats.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beats.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        while not done.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:  # a missed beat is retried; the TTL spans three of them
                self.log.warning("heartbeat for job %s failed: %s", job.id, exc)


def run_worker(
    redis_url: str,
    settings: Settings,
    *,
    name: str | None = None,
    burst: bool = False,
    heartbeat_s: int = 30,
    queue_name: str = QUEUE_NAME,
) -> bool:
    """Load the models, then process pre-annotation jobs until stopped (SIGTERM / SIGINT:
    after the current job) or, with ``burst``, until the queue is empty.

    Registry maintenance (re-queueing a dead worker's job) runs every ``10 * heartbeat_s``
    seconds instead of RQ's ten minutes; the idle wait for a job is bounded likewise so an idle
    worker gets to it. The worker also runs RQ's scheduler: failed jobs wait for their retry
    interval in the scheduled registry, and without a scheduler nothing would ever enqueue
    them again (one worker per queue holds the scheduler's lock; when it stops, another takes
    the lock at its next maintenance). It runs in a process forked from this one after the
    models are loaded, and only talks to Redis, so the loaded models (and CUDA) are never used
    from it.
    """
    init_worker(settings)  # a wrong model id or a missing key fails here, not in the first job
    worker = ModelWorker(
        [queue_name],
        connection=Redis.from_url(redis_url),
        name=name,
        job_monitoring_interval=heartbeat_s,
        maintenance_interval=10 * heartbeat_s,
        worker_ttl=10 * heartbeat_s + 15,  # RQ waits worker_ttl - 15 s for a job, then maintains
    )
    return worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=True)
