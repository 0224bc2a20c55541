"""``preannotate`` (a whole project, here or on RQ workers) and ``worker`` subcommands.

The logic lives in ``backend.jobs``; this module parses flags, draws the progress bar and
prints the summary. Exit status: 0 when every task in scope holds a prediction of the current
model_version, 1 when a task failed (listed; the next run retries it) or the run stopped on
an error, 2 for a configuration error, 130 when stopped by Ctrl-C (run again to resume).

``backend.jobs`` (and through it torch and the model code), the Label Studio SDK and client,
httpx, Redis and RQ are imported inside the commands, not here: ``grounded-sam-backend --help``
and flag errors build this module's parsers and should answer at once, not after seconds of
importing torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from backend.config import ConfigError, Settings
from backend.logs import configure_logging

if TYPE_CHECKING:
    from backend import jobs


def _settings(args: argparse.Namespace) -> Settings:
    """Environment settings; ``--ls-url`` / ``--api-key`` override ``LABEL_STUDIO_URL`` /
    ``LABEL_STUDIO_API_KEY`` (the models also fetch task images with them)."""
    overrides = {"label_studio_url": args.ls_url, "label_studio_api_key": args.api_key}
    settings = Settings.from_env(**{key: value for key, value in overrides.items() if value})
    configure_logging(settings.log_level, settings.log_format)
    # httpx logs every API call at INFO: thousands of lines over the progress bar.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    return settings


def _print_plan(plan: jobs.Plan, out: TextIO) -> None:
    print(
        f"project {plan.project}, model_version {plan.model_version}: {plan.in_scope} tasks in scope, "
        f"{plan.already_predicted} already predicted (skipped), {len(plan.todo)} to predict"
        + (f", {plan.deferred} left for a later run (--limit)" if plan.deferred else ""),
        file=out,
    )
    if plan.not_found:
        print(f"not in project {plan.project} (counted as failed): task ids {plan.not_found}", file=out)


def _print_summary(summary: jobs.RunSummary, out: TextIO) -> None:
    print(f"done {summary.done}, skipped {summary.skipped}, failed {len(summary.failed)}", file=out)
    if summary.failed:
        print("failed tasks (tried again on the next run):", file=out)
        for task_id in sorted(summary.failed):
            print(f"  {summary.failed[task_id]}", file=out)
    if summary.error:
        print(f"stopped early: {summary.error}; run the same command again to resume", file=out)
    if summary.interrupted:
        print("interrupted: run the same command again to resume", file=out)


def _progress(total: int, description: str) -> tqdm:
    """Bar with rate and ETA on stderr; the failure count rides along as a postfix."""
    return tqdm(total=total, unit="task", desc=description, dynamic_ncols=True, file=sys.stderr)


def _on_result(bar: tqdm) -> Callable[[jobs.BatchResult], None]:
    failed = 0

    def update(result: jobs.BatchResult) -> None:
        nonlocal failed
        failed += len(result.failed)
        bar.set_postfix(failed=failed, refresh=False)
        bar.update(result.count)

    return update


@dataclass
class _StopNotice:
    """Tells the user what the first Ctrl-C does; ``what`` follows the command's phase."""

    what: str

    def __call__(self) -> None:
        tqdm.write(f"Ctrl-C: {self.what}; press Ctrl-C again to abort at once", file=sys.stderr)


def _preannotate(args: argparse.Namespace) -> int:
    from backend import jobs
    from backend.ls_client import LabelStudioClient

    if args.wait and not args.queue:
        raise ValueError("--wait follows queue jobs: it needs --queue")
    settings = _settings(args)
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    # Ctrl-C is caught from here on: planning a large project and loading the models take a
    # while, and a Ctrl-C then should end the command with a message, not a traceback.
    notice = _StopNotice("stopping once the plan is made (nothing is posted or enqueued)")
    with jobs.stop_on_sigint(notice) as stop:
        plan = jobs.make_plan(
            client,
            args.project,
            settings,
            view=args.view,
            task_ids=args.task_ids,
            limit=args.limit,
            overwrite=args.overwrite,
        )
        _print_plan(plan, sys.stdout)
        if stop.is_set():  # before any model is loaded or any job enqueued
            print("interrupted: nothing was posted or enqueued; run the same command again", file=sys.stdout)
            return jobs.EXIT_INTERRUPTED
        if args.queue:
            return _preannotate_on_queue(args, plan, stop, notice)
        if args.dry_run:
            print("dry run: no models loaded, nothing posted", file=sys.stdout)
            return plan.start_summary().exit_code  # given ids missing from the project fail
        if not plan.todo:  # nothing to do: no reason to load models
            summary = plan.start_summary()
            _print_summary(summary, sys.stdout)
            return summary.exit_code
        notice.what = "stopping once the models are loaded (nothing is posted)"
        predictor = jobs.build_predictor(settings)
        notice.what = "stopping after the current batch"
        with logging_redirect_tqdm(), _progress(len(plan.todo), "preannotate") as bar:
            # a Ctrl-C during the loading stops here before the first batch: nothing posted
            summary = jobs.run_batches(
                client,
                predictor,
                plan,
                batch_size=args.batch_size,
                stop=stop,
                on_batch=_on_result(bar),
            )
    _print_summary(summary, sys.stdout)
    return summary.exit_code


def _preannotate_on_queue(
    args: argparse.Namespace, plan: jobs.Plan, stop: threading.Event, notice: _StopNotice
) -> int:
    from rq import Worker

    from backend import jobs

    notice.what = "stopping before anything is enqueued"
    queue = jobs.open_queue(args.queue)
    if args.dry_run:
        chunks = -(-len(plan.todo) // args.batch_size)
        print(f"dry run: would enqueue {chunks} jobs of up to {args.batch_size} tasks on {queue.name}")
        return plan.start_summary().exit_code  # given ids missing from the project fail
    if stop.is_set():  # Ctrl-C while connecting to the queue
        print("interrupted: nothing was enqueued; run the same command again", file=sys.stdout)
        return jobs.EXIT_INTERRUPTED
    notice.what = "stopping once the jobs are enqueued (the workers will run them)"
    attached, new = jobs.enqueue_plan(queue, plan, batch_size=args.batch_size, job_timeout_s=args.job_timeout)
    tasks_new = sum(len(jobs.job_task_ids(job)) for job in new)
    print(f"enqueued {len(new)} jobs ({tasks_new} tasks) on {queue.name}", file=sys.stdout)
    if attached:
        print(f"{len(attached)} jobs of an earlier call, still queued or running, cover the other tasks")
    if not Worker.count(queue=queue):
        print(f"no worker listens on {queue.name} yet: start some with grounded-sam-backend worker --queue URL")
    if not args.wait or stop.is_set():
        print("follow the jobs with --wait (the same command again)")
        return jobs.EXIT_INTERRUPTED if stop.is_set() else plan.start_summary().exit_code
    followed = attached + new
    notice.what = "no longer waiting (the workers carry on)"
    with (
        logging_redirect_tqdm(),
        _progress(sum(len(jobs.job_task_ids(job)) for job in followed), "preannotate (queue)") as bar,
    ):
        summary = jobs.follow(queue, followed, stop=stop, summary=plan.start_summary(), on_result=_on_result(bar))
    _print_summary(summary, sys.stdout)
    return summary.exit_code


def _worker(args: argparse.Namespace) -> int:
    from backend import jobs

    settings = _settings(args)
    jobs.run_worker(args.queue, settings, name=args.name, burst=args.burst, heartbeat_s=args.heartbeat_s)
    return 0


def _guarded(name: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures (bad flags, Label Studio or Redis refusing or unreachable): one line, exit 1."""

    def wrapper(args: argparse.Namespace) -> int:
        import httpx  # here, not at the top: see the module docstring
        from label_studio_sdk.core.api_error import ApiError
        from redis.exceptions import RedisError

        try:
            return run(args)
        except ConfigError:
            raise  # main() reports it with exit status 2
        except ValueError as exc:  # LabelConfigError and missing URL/key are ValueErrors
            message = str(exc)
        except (ApiError, httpx.HTTPError) as exc:
            from backend import jobs

            message = jobs.describe_error(exc)
        except RedisError as exc:
            message = f"Redis: {exc}"
        print(f"grounded-sam-backend {name}: error: {message}", file=sys.stderr)
        return 1

    return wrapper


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_ls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ls-url", help="Label Studio URL (default: LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", help="API key or personal access token (default: LABEL_STUDIO_API_KEY)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``preannotate`` and ``worker`` to the CLI's subparsers."""
    pre = subparsers.add_parser(
        "preannotate",
        help="pre-annotate a whole Label Studio project (resumable; --queue for RQ workers)",
        description="Predict every task of a project that lacks a prediction of the current model_version "
        "and post the predictions through the API. Running it again resumes; failed tasks are retried. "
        "Ctrl-C stops after the current batch.",
    )
    _add_ls_args(pre)
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument(
        "--batch-size",
        type=_positive,
        default=16,
        help="tasks per posting batch and per queue job (default: 16)",
    )
    pre.add_argument("--limit", type=_positive, help="predict at most this many tasks in this run")
    scope = pre.add_mutually_exclusive_group()
    scope.add_argument("--view", type=int, help="only the tasks of this Data Manager view (tab) id")
    scope.add_argument("--task-ids", type=int, nargs="+", metavar="ID", help="only these task ids")
    pre.add_argument("--dry-run", action="store_true", help="show what would be done; load no model, post nothing")
    pre.add_argument(
        "--overwrite",
        action="store_true",
        help="also predict tasks that hold a prediction of the current model_version, replacing it",
    )
    pre.add_argument("--queue", metavar="REDIS_URL", help="enqueue RQ jobs (e.g. redis://host:6379/0) instead")
    pre.add_argument("--wait", action="store_true", help="with --queue: show progress until the jobs are done")
    pre.add_argument(
        "--job-timeout",
        type=_positive,
        default=3600,
        help="with --queue: seconds one job (one batch) may run (default: 3600)",
    )
    pre.set_defaults(func=_guarded("preannotate", _preannotate))

    worker = subparsers.add_parser(
        "worker",
        help="run an RQ worker for `preannotate --queue` jobs (models loaded once per process)",
        description="Load the models once, then run pre-annotation jobs from the queue until stopped "
        "(SIGTERM/Ctrl-C: after the current job). Label Studio's URL and key come from this worker's "
        "flags or environment, never from the job.",
    )
    _add_ls_args(worker)
    worker.add_argument("--queue", metavar="REDIS_URL", required=True, help="redis://host:6379/0")
    worker.add_argument("--name", help="worker name shown by `rq info` (default: RQ's)")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.add_argument(
        "--heartbeat-s",
        type=_positive,
        default=30,
        help="job heartbeat period; a killed worker's job is re-run about 3 periods later (default: 30)",
    )
    worker.set_defaults(func=_guarded("worker", _worker))
