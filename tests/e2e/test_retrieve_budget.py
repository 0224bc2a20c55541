"""*Retrieve predictions* on more tasks than one ``/predict`` may take, against the real Label Studio.

Label Studio sends all the project's tasks in one call and stores nothing if the answer comes
after 100 s. The backend (``serve``, with fake models that take ``EMBED_DELAY_S`` per image, via
``GSB_PREDICTOR_FACTORY``) answers the tasks that fit ``PREDICT_TIME_BUDGET_S`` and posts the
others from the background through the API. A second *Retrieve predictions* while it works must
not produce a second prediction: every task ends with exactly one of the backend's version.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from backend.jobs import PREDICTOR_FACTORY_ENV
from tests.batch_predictor import FACTORY

from .backend_server import BackendServer
from .label_studio import REPO_ROOT, LabelStudio, LSApi

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="rect" toName="image"><Label value="cat"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>"""  # the smart tag keeps the (slow fake) segmenter in pre-annotation: rectangles alone skip it
TASKS = 6
EMBED_DELAY_S = 2.0  # per image: the background needs >= 8 s for the tasks past the budget
BUDGET_S = 5.0  # room for two tasks at most: after two, 4 s spent + 2 s slowest > 5 s
POLL_S = 120.0


@pytest.fixture
def slow_backend(label_studio: LabelStudio, tmp_path: Path) -> Iterator[BackendServer]:
    """The backend as users run it, on slow fake models, able to post to this Label Studio."""
    settings = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        PREDICTOR_FACTORY_ENV: FACTORY,
        "GSB_TEST_EMBED_DELAY_S": str(EMBED_DELAY_S),
        "PREDICT_TIME_BUDGET_S": str(BUDGET_S),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DEVICE": "cpu",
    }
    with BackendServer(tmp_path / "backend", settings) as server:
        yield server


def _project(api: LSApi, tmp_path: Path) -> tuple[int, list[int]]:
    project = api.create_project("retrieve past the budget", CONFIG)["id"]
    paths = []
    for index in range(TASKS):
        path = tmp_path / f"image-{index}.png"
        Image.new("RGB", (32, 24), (40 * index % 256, 90, 200)).save(path)  # distinct: no cache hits
        paths.append(path)
    api.import_files(project, paths)
    return project, [task["id"] for task in api.list_tasks(project)]


def _stored(api: LSApi, task_ids: list[int]) -> dict[int, list[str]]:
    """Each task's predictions, as their model versions."""
    return {task_id: [p["model_version"] for p in api.predictions(task_id)] for task_id in task_ids}


def test_retrieve_predictions_past_the_budget_stores_exactly_one_each(
    label_studio: LabelStudio, slow_backend: BackendServer, tmp_path: Path
) -> None:
    api = label_studio.api
    health = requests.get(f"{slow_backend.url}/health", timeout=10).json()
    assert health["models"]["segmenter"] == "test/box-fill-segmenter"  # serve honours the factory hook
    project, task_ids = _project(api, tmp_path)
    assert len(task_ids) == TASKS
    api.connect_ml(project, slow_backend.url, interactive=False)
    version = requests.post(
        f"{slow_backend.url}/setup", json={"project": str(project), "schema": CONFIG}, timeout=10
    ).json()["model_version"]

    api.retrieve_predictions(project)
    queued = slow_backend.metric("gsb_deferred_tasks_total", outcome="queued")
    assert TASKS - 2 <= queued < TASKS, slow_backend.log_tail()
    stored = _stored(api, task_ids)
    # Label Studio stored the tasks answered in time, skipping the deferred items.
    assert sum(len(found) for found in stored.values()) >= TASKS - queued

    # Again, while the background is busy: Label Studio re-sends what it still lacks.
    api.retrieve_predictions(project)
    resent = slow_backend.metric("gsb_deferred_tasks_total", outcome="already_queued")
    requeued = slow_backend.metric("gsb_deferred_tasks_total", outcome="queued") - queued
    assert resent + requeued >= 1, slow_backend.log_tail()

    deadline = time.monotonic() + POLL_S
    while True:
        stored = _stored(api, task_ids)
        idle = slow_backend.metric("gsb_deferred_pending") == 0
        if idle and all(stored.values()):
            break
        assert time.monotonic() < deadline, f"after {POLL_S:.0f} s: {stored}\n{slow_backend.log_tail()}"
        time.sleep(1)
    assert stored == {task_id: [version] for task_id in task_ids}
    assert slow_backend.metric("gsb_deferred_tasks_total", outcome="posted") == queued
    assert slow_backend.metric("gsb_deferred_tasks_total", outcome="failed") == 0
