"""``grounded-sam-backend preannotate`` and ``worker`` against the real Label Studio, with the
fake models (``GSB_PREDICTOR_FACTORY``) so every region is known exactly: failures reported and
retried, a second run posting nothing, Ctrl-C then rerun, and RQ workers sharing a queue on a
real redis-server, one of them killed mid-job. Every test ends with exactly one prediction per
good task, checked in Label Studio.

Runs that must be real processes (the exit status of the entry point, Ctrl-C, workers killed by
PID) are subprocesses; the others call ``backend.cli.main`` in the test process, which spares a
torch import of 10-30 s each on a busy machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from redis import Redis
from rq import Worker
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry

from backend.cli import main
from backend.config import Settings
from backend.jobs import PREDICTOR_FACTORY_ENV, QUEUE_NAME
from backend.labeling import parse_label_config
from backend.predictor import model_version_for
from tests.batch_predictor import CAT_BOX, FACTORY
from tests.redis_server import redis_server

from .label_studio import REPO_ROOT, LabelStudio, LSApi

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="rect" toName="image"><Label value="cat"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>"""  # the smart tag keeps the (slow fake) segmenter in pre-annotation: rectangles alone skip it
WIDTH, HEIGHT = 32, 24
CLI_TIMEOUT_S = 300


def _environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            PREDICTOR_FACTORY_ENV: FACTORY,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def _command(ls: LabelStudio, subcommand: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "backend.cli", subcommand, "--ls-url", ls.url, "--api-key", ls.token, *args]


def _cli(ls: LabelStudio, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(ls, "preannotate", *args),
        env=_environment(**env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def _main(ls: LabelStudio, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``grounded-sam-backend preannotate ...`` in this process: (exit status, stdout, stderr).

    A run still going after ``CLI_TIMEOUT_S`` gets Ctrl-C (it then exits 130 and the test fails
    with its output) instead of hanging the suite, e.g. ``--wait`` on a job nobody re-runs.
    """
    capsys.readouterr()
    watchdog = threading.Timer(CLI_TIMEOUT_S, os.kill, args=(os.getpid(), signal.SIGINT))
    watchdog.start()
    try:
        code = main(["preannotate", "--ls-url", ls.url, "--api-key", ls.token, *args])
    finally:
        watchdog.cancel()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _fake_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs load the fake models too (subprocesses get it from ``_environment``)."""
    monkeypatch.setenv(PREDICTOR_FACTORY_ENV, FACTORY)


def _project(api: LSApi, tmp_path: Path, title: str, good: int, broken: int = 0) -> tuple[int, list[int], list[int]]:
    """A project of ``good`` small PNGs and ``broken`` files that are not images; returns
    (project id, good task ids, broken task ids)."""
    project = api.create_project(title, CONFIG)["id"]
    folder = tmp_path / f"images-{project}"
    folder.mkdir()
    paths = []
    for index in range(good):
        path = folder / f"good-{index}.png"
        Image.new("RGB", (WIDTH, HEIGHT), (10 * index % 256, 80, 160)).save(path)
        paths.append(path)
    for index in range(broken):
        path = folder / f"broken-{index}.png"
        path.write_bytes(b"this is not a PNG")
        paths.append(path)
    api.import_files(project, paths)
    tasks = api.list_tasks(project)
    assert len(tasks) == good + broken
    broken_ids = [t["id"] for t in tasks if "broken-" in t["data"]["image"]]
    return project, [t["id"] for t in tasks if t["id"] not in broken_ids], broken_ids


def _predictions(api: LSApi, task_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    return {task_id: api.predictions(task_id) for task_id in task_ids}


def _stored_count(api: LSApi, project: int) -> int:
    return int(api.request("GET", "/api/tasks", params={"project": project, "page_size": 1})["total_predictions"])


def _expected_version() -> str:
    return model_version_for(Settings.from_env(_environment()), parse_label_config(CONFIG))


def _assert_exactly_one_each(api: LSApi, task_ids: list[int]) -> None:
    version = _expected_version()
    stored = _predictions(api, task_ids)
    counts = {task_id: len(found) for task_id, found in stored.items()}
    assert set(counts.values()) == {1}, counts
    assert {p["model_version"] for found in stored.values() for p in found} == {version}


def test_preannotate_reports_failures_and_a_second_run_posts_nothing(
    label_studio: LabelStudio, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = label_studio.api
    project, good, broken = _project(api, tmp_path, "batch failures", good=18, broken=2)

    first = _cli(label_studio, "--project", str(project), "--batch-size", "4")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "done 18, skipped 0, failed 2" in first.stdout, first.stdout
    for task_id in broken:
        assert f"  task {task_id}: " in first.stdout  # listed with its reason
    assert "not an image" in first.stdout
    assert "task/s" in first.stderr and "20/20" in first.stderr  # progress bar with its rate

    _assert_exactly_one_each(api, good)
    stored = _predictions(api, good + broken)
    assert all(stored[task_id] == [] for task_id in broken)
    [region] = stored[good[0]][0]["result"]
    x0, y0, x1, y1 = CAT_BOX
    assert region["value"]["rectanglelabels"] == ["cat"]
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    assert region["value"]["x"] == pytest.approx(100 * x0 / WIDTH)
    assert region["value"]["y"] == pytest.approx(100 * y0 / HEIGHT)
    assert region["value"]["width"] == pytest.approx(100 * (x1 - x0) / WIDTH)
    assert region["value"]["height"] == pytest.approx(100 * (y1 - y0) / HEIGHT)
    assert stored[good[0]][0]["score"] == pytest.approx(region["score"])
    ids_before = sorted(p["id"] for found in stored.values() for p in found)

    code, out, err = _main(label_studio, capsys, "--project", str(project), "--dry-run")
    assert code == 0, err
    assert "20 tasks in scope, 18 already predicted (skipped), 2 to predict" in out

    code, out, err = _main(label_studio, capsys, "--project", str(project), "--batch-size", "4")
    assert code == 1, out + err
    assert "done 0, skipped 18, failed 2" in out  # the broken ones were tried again
    after = _predictions(api, good + broken)
    assert sorted(p["id"] for found in after.values() for p in found) == ids_before


def test_interrupted_run_then_rerun_gives_exactly_one_prediction_each(
    label_studio: LabelStudio, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = label_studio.api
    project, good, _ = _project(api, tmp_path, "batch interrupted", good=12)
    run = subprocess.Popen(
        _command(label_studio, "preannotate", "--project", str(project), "--batch-size", "3"),
        env=_environment(GSB_TEST_EMBED_DELAY_S="0.4"),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while _stored_count(api, project) == 0:  # the first batch is posted: Ctrl-C now
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, out + err
    assert "interrupted" in out and "Ctrl-C" in err
    stored = _stored_count(api, project)
    assert stored % 3 == 0 and 3 <= stored < 12, stored  # whole batches only, then it stopped

    code, out, err = _main(label_studio, capsys, "--project", str(project), "--batch-size", "3")
    assert code == 0, out + err
    assert f"done {12 - stored}, skipped {stored}, failed 0" in out
    _assert_exactly_one_each(api, good)



@contextmanager
def _workers(ls: LabelStudio, redis_url: str, tmp_path: Path, names: list[str]) -> Iterator[dict]:
    """Worker processes by name, registered in Redis when this yields; stopped by PID after."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"worker-{name}.log" for name in names}
    try:
        for name in names:
            with logs[name].open("wb") as log:
                processes[name] = subprocess.Popen(
                    _command(ls, "worker", "--queue", redis_url, "--name", name, "--heartbeat-s", "2"),
                    env=_environment(GSB_TEST_EMBED_DELAY_S="0.4"),  # each job takes a while
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        connection = Redis.from_url(redis_url)
        deadline = time.monotonic() + 180
        while {w.name for w in Worker.all(connection=connection)} != set(names):
            for name, process in processes.items():
                assert process.poll() is None, logs[name].read_text()
            assert time.monotonic() < deadline, "the workers did not register in Redis"
            time.sleep(0.2)
        yield processes
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()  # RQ's warm shutdown: after the current job
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _kill_when_busy(redis_url: str, worker: subprocess.Popen[bytes], name: str, found: list[str]) -> None:
    """Wait until worker ``name`` runs a job, note the job id in ``found``, SIGKILL it."""
    connection = Redis.from_url(redis_url)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while time.monotonic() < deadline:
        busy = next((w for w in Worker.all(connection=connection) if w.name == name), None)
        job_id = busy.get_current_job_id() if busy else None
        if job_id:
            found.append(job_id)
            os.kill(worker.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_rq_workers_share_the_queue_and_a_killed_workers_job_is_rerun(
    label_studio: LabelStudio, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = label_studio.api
    shared, shared_tasks, _ = _project(api, tmp_path, "batch queue", good=12)
    killed, killed_tasks, _ = _project(api, tmp_path, "batch killed worker", good=12)
    with redis_server(tmp_path) as url, _workers(label_studio, url, tmp_path, ["w1", "w2"]) as workers:
        connection = Redis.from_url(url)

        # Two workers, one queue: every task done once, both workers busy.
        args = ["--batch-size", "2", "--queue", url, "--wait"]
        code, out, err = _main(label_studio, capsys, "--project", str(shared), *args)
        assert code == 0, out + err
        assert "enqueued 6 jobs (12 tasks)" in out and "done 12, skipped 0, failed 0" in out
        finished = FinishedJobRegistry(QUEUE_NAME, connection=connection).get_job_ids()
        assert {job.worker_name for job in Job.fetch_many(finished, connection=connection)} == {"w1", "w2"}
        _assert_exactly_one_each(api, shared_tasks)

        # w1 is killed (SIGKILL, by PID) in the middle of a job: w2 re-runs that job.
        victim_job: list[str] = []
        killer = threading.Thread(target=_kill_when_busy, args=(url, workers["w1"], "w1", victim_job))
        killer.start()
        args = ["--batch-size", "3", "--queue", url, "--wait"]
        code, out, err = _main(label_studio, capsys, "--project", str(killed), *args)
        killer.join()
        assert victim_job and workers["w1"].wait(timeout=10) == -signal.SIGKILL
        assert code == 0, out + err
        assert "failed 0" in out
        rerun = Job.fetch(victim_job[0], connection=connection)
        assert rerun.get_status() == JobStatus.FINISHED and rerun.worker_name == "w2"
    _assert_exactly_one_each(api, killed_tasks)
