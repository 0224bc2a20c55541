"""``grounded-sam-backend preannotate`` as a command, against the in-memory Label Studio of
``test_jobs``: Ctrl-C before any batch (while planning, while loading the models) and the
exit status of the runs that predict nothing here (``--dry-run``, ``--queue`` without
``--wait``) when given task ids are not in the project."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backend import jobs
from backend.cli import main
from backend.commands import batch_commands
from backend.config import Settings
from backend.metrics import Metrics
from backend.predictor import Predictor
from tests.batch_predictor import fake_predictor
from tests.redis_server import redis_server
from tests.test_jobs import IMAGE, FakeLabelStudio

PREANNOTATE = ["preannotate", "--project", "1", "--batch-size", "2"]


@pytest.fixture
def ls(monkeypatch: pytest.MonkeyPatch) -> FakeLabelStudio:
    """The Label Studio every ``preannotate`` of the test talks to (tasks 1..4)."""
    fake = FakeLabelStudio({i: IMAGE for i in range(1, 5)})
    settings = Settings(label_studio_url="http://label-studio.test", label_studio_api_key="key")
    # _settings would also reconfigure the root logger, under pytest's log capture
    monkeypatch.setattr(batch_commands, "_settings", lambda args: settings)
    monkeypatch.setattr("backend.ls_client.LabelStudioClient", lambda url, api_key: fake)
    return fake


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _preannotate(*flags: str) -> int:
    """Run the command; a Ctrl-C that escapes it fails the test instead of ending pytest."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = main([*PREANNOTATE, *flags])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt (a traceback)")
    assert signal.getsignal(signal.SIGINT) is handler  # the command's handler is gone again
    return code


def _loading(before: Callable[[], None]) -> Callable[[Settings], Predictor]:
    def build(settings: Settings) -> Predictor:
        before()
        return fake_predictor(settings, Metrics())

    return build


def test_ctrl_c_while_planning_stops_before_loading_models(
    ls: FakeLabelStudio, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = ls.task_ids

    def task_ids_then_ctrl_c(*args: Any, **kwargs: Any) -> list[int]:
        _ctrl_c()
        return listing(*args, **kwargs)

    monkeypatch.setattr(ls, "task_ids", task_ids_then_ctrl_c)
    monkeypatch.setattr(jobs, "build_predictor", _loading(lambda: pytest.fail("models loaded after Ctrl-C")))

    assert _preannotate() == jobs.EXIT_INTERRUPTED
    out, err = capsys.readouterr()
    assert "Ctrl-C: stopping once the plan is made" in err
    assert "interrupted: nothing was posted or enqueued" in out
    assert ls.import_calls == 0 and ls.predictions == []


def test_ctrl_c_while_loading_models_posts_nothing(
    ls: FakeLabelStudio, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(jobs, "build_predictor", _loading(_ctrl_c))

    assert _preannotate() == jobs.EXIT_INTERRUPTED
    out, err = capsys.readouterr()
    assert "Ctrl-C: stopping once the models are loaded" in err
    assert "done 0, skipped 0, failed 0" in out and "interrupted" in out
    assert ls.import_calls == 0 and ls.predictions == []


def test_dry_run_fails_on_task_ids_not_in_the_project(ls: FakeLabelStudio, capsys: pytest.CaptureFixture[str]) -> None:
    assert _preannotate("--dry-run", "--task-ids", "1", "2") == 0
    assert _preannotate("--dry-run", "--task-ids", "1", "99") == 1
    assert "task ids [99]" in capsys.readouterr().out
    assert ls.import_calls == 0


def test_queue_without_wait_fails_on_task_ids_not_in_the_project(
    ls: FakeLabelStudio, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with redis_server(tmp_path) as url:
        assert _preannotate("--queue", url, "--dry-run", "--task-ids", "1", "99") == 1
        assert _preannotate("--queue", url, "--task-ids", "1", "99") == 1
        out = capsys.readouterr().out
        assert "task ids [99]" in out and "enqueued 1 jobs (1 tasks)" in out
        [job] = jobs.active_jobs(jobs.open_queue(url), 1, jobs.make_plan(ls, 1, Settings()).model_version)
        assert jobs.job_task_ids(job) == [1]


def test_ctrl_c_while_connecting_to_the_queue_enqueues_nothing(
    ls: FakeLabelStudio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    opening = jobs.open_queue

    def open_then_ctrl_c(url: str) -> Any:
        queue = opening(url)
        _ctrl_c()
        return queue

    with redis_server(tmp_path) as url:
        monkeypatch.setattr(jobs, "open_queue", open_then_ctrl_c)
        assert _preannotate("--queue", url) == jobs.EXIT_INTERRUPTED
        out, err = capsys.readouterr()
        assert "Ctrl-C: stopping before anything is enqueued" in err
        assert "interrupted: nothing was enqueued" in out
        monkeypatch.setattr(jobs, "open_queue", opening)
        assert jobs.active_jobs(opening(url), 1, jobs.make_plan(ls, 1, Settings()).model_version) == []


def test_ctrl_c_while_enqueueing_reports_an_interrupted_run(
    ls: FakeLabelStudio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    enqueue = jobs.enqueue_plan

    def enqueue_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        result = enqueue(*args, **kwargs)
        _ctrl_c()
        return result

    monkeypatch.setattr(jobs, "enqueue_plan", enqueue_then_ctrl_c)
    with redis_server(tmp_path) as url:
        assert _preannotate("--queue", url) == jobs.EXIT_INTERRUPTED
        out, err = capsys.readouterr()
        assert "Ctrl-C: stopping once the jobs are enqueued" in err
        assert "enqueued 2 jobs (4 tasks)" in out and "--wait" in out
