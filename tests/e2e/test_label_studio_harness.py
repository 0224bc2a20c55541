"""Proves the e2e harness itself against a real Label Studio: project, upload, task list, and
that Label Studio really calls an ML backend URL on connect (a closed port is refused with 400).
The backend's own end-to-end tests build on the same fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from .label_studio import LabelStudio, LSApiError, free_port

pytestmark = pytest.mark.e2e

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </BrushLabels>
</View>"""


def _png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def test_project_upload_tasks_and_ml_refusal(label_studio: LabelStudio, tmp_path: Path) -> None:
    api = label_studio.api
    project = api.create_project("harness check", BRUSH_CONFIG)
    images = [
        _png(tmp_path / "red.png", (32, 24), (200, 30, 30)),
        _png(tmp_path / "blue.png", (20, 40), (30, 30, 200)),
    ]

    imported = api.import_files(project["id"], images)
    assert imported["task_count"] == 2, imported

    tasks = api.list_tasks(project["id"])
    assert len(tasks) == 2
    # Uploaded images stay relative to Label Studio: the backend must resolve them itself.
    assert all(task["data"]["image"].startswith("/data/upload/") for task in tasks), tasks

    # Nothing listens on this port: Label Studio calls /health and /setup before saving the
    # backend, so it must refuse. This proves it reaches loopback URLs (SSRF guard off) at all.
    with pytest.raises(LSApiError) as refused:
        api.connect_ml(project["id"], f"http://127.0.0.1:{free_port()}")
    assert refused.value.status == 400, refused.value
    assert api.ml_backends(project["id"]) == []
