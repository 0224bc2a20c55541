"""The whole loop with the real Label Studio and this backend as users run it (``serve``, tiny
random models): connect, pre-annotate uploaded images, interactive clicks and boxes, the
annotation webhook, and ``export-coco`` on Label Studio's own JSON export.

Random weights make what is found arbitrary, so the assertions are about what must hold for
any model: each prediction sits on its own task with that task's displayed size (the three
images differ, so results out of task order fail), region types follow the controls, labels
come from the config, masks decode to the image size, and the exported COCO masks are the
stored ones pixel for pixel.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from pycocotools.coco import COCO

from backend.regions import decode_region_mask

from .backend_server import BackendServer
from .conftest import LabelStudio
from .grounded_project import (
    LABEL_CONFIG,
    LABELS,
    MASK_CONTROLS,
    OUTPUT_TYPES,
    PreannotatedProject,
    create_preannotated_project,
    wait_connected,
)
from .label_studio import REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(
    label_studio: LabelStudio, backend_server: BackendServer, tmp_path_factory: pytest.TempPathFactory
) -> PreannotatedProject:
    return create_preannotated_project(
        label_studio.api, backend_server.url, tmp_path_factory.mktemp("images"), "grounded-sam e2e"
    )


@pytest.fixture(scope="module")
def model_version(backend_server: BackendServer) -> str:
    """What the backend's /setup answers for this config: every stored prediction must carry it."""
    answer = requests.post(f"{backend_server.url}/setup", json={"schema": LABEL_CONFIG, "project": "0.0"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["model_version"]


def _single_prediction(label_studio: LabelStudio, task_id: int) -> dict[str, Any]:
    predictions = label_studio.api.predictions(task_id)
    assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions stored"
    return predictions[0]


def _check_region(region: dict[str, Any], size: tuple[int, int], where: str) -> None:
    """What every region of any model must satisfy on an image of displayed ``size``."""
    width, height = size
    kind = region["type"]
    assert region["to_name"] == "image", where
    assert kind == OUTPUT_TYPES.get(region["from_name"]), f"{where}: {region['from_name']} -> {kind}"
    assert (region["original_width"], region["original_height"]) == size, f"{where}: region size vs image size"
    labels = region["value"][kind]
    assert len(labels) == 1 and labels[0] in LABELS, f"{where}: labels {labels}"
    if region["from_name"] in MASK_CONTROLS:
        mask = np.asarray(decode_region_mask(region))
        assert mask.shape == (height, width), f"{where}: mask {mask.shape} on a {width}x{height} image"
        assert mask.any(), f"{where}: empty mask stored"
    elif kind == "polygonlabels":
        points = np.asarray(region["value"]["points"], dtype=float)
        assert points.ndim == 2 and points.shape[0] >= 3 and points.shape[1] == 2, where
        assert ((points >= 0) & (points <= 100)).all(), f"{where}: polygon outside the image"
    else:
        value = region["value"]
        assert value["width"] > 0 and value["height"] > 0, where
        assert value["x"] >= 0 and value["y"] >= 0, where
        assert value["x"] + value["width"] <= 100 + 1e-6 and value["y"] + value["height"] <= 100 + 1e-6, where


def test_label_studio_reports_the_backend_connected(label_studio: LabelStudio, project: PreannotatedProject) -> None:
    backend = wait_connected(label_studio.api, project.id, project.ml_id)
    assert backend["is_interactive"] is True
    assert backend["url"].startswith("http://127.0.0.1:")


def test_every_task_holds_one_prediction_of_its_own_image(
    label_studio: LabelStudio, project: PreannotatedProject, model_version: str
) -> None:
    assert len(project.tasks) == 3
    assert len(set(project.sizes.values())) == 3, "sizes must differ or a task-order swap goes unnoticed"
    # ...and all three must reach the backend in one /predict: a call per task has no order to break
    assert (project.predict_calls, project.predicted_tasks) == (1, 3), "batch /predict calls, tasks carried"
    for task in project.tasks:
        size = project.sizes[task["id"]]
        prediction = _single_prediction(label_studio, task["id"])
        where = f"task {task['id']} ({project.files[task['id']]}, {size[0]}x{size[1]})"
        assert prediction["model_version"] == model_version, where
        regions = prediction["result"]
        # Thresholds 0 on random weights: every output control gets regions on every image.
        assert {region["from_name"] for region in regions} == set(OUTPUT_TYPES), where
        assert len({region["id"] for region in regions}) == len(regions), f"{where}: duplicate region ids"
        for region in regions:
            _check_region(region, size, f"{where}, region {region['id']}")


def test_exif_rotated_jpeg_is_predicted_at_its_displayed_size(
    label_studio: LabelStudio, project: PreannotatedProject
) -> None:
    (task_id,) = [tid for tid, name in project.files.items() if name == "rotated-exif6.jpg"]
    regions = _single_prediction(label_studio, task_id)["result"]
    # Stored 72x40 with orientation 6: Label Studio shows it 40 wide, 72 high.
    assert {(r["original_width"], r["original_height"]) for r in regions} == {(40, 72)}


# (type, smart control, value, flags) of one region as Label Studio's labeling UI sends it in
# ``context.result``: a positive click, and a drawn box.
KEYPOINT = (
    "keypointlabels",
    "click",
    {"x": 30.0, "y": 45.0, "width": 0.5, "keypointlabels": ["cat"]},
    {"is_positive": True},
)
BOX = (
    "rectanglelabels",
    "smart_box",
    {"x": 10.0, "y": 20.0, "width": 45.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["dog"]},
    {},
)


@pytest.mark.parametrize(
    ("kind", "control", "value", "flags"), [pytest.param(*KEYPOINT, id="keypoint"), pytest.param(*BOX, id="box")]
)
def test_interactive_annotating_returns_one_mask_in_the_first_mask_control(
    label_studio: LabelStudio,
    project: PreannotatedProject,
    model_version: str,
    kind: str,
    control: str,
    value: dict[str, Any],
    flags: dict[str, Any],
) -> None:
    # The portrait EXIF image: a mask at the stored (landscape) size would fail the size checks.
    (task_id,) = [tid for tid, name in project.files.items() if name == "rotated-exif6.jpg"]
    size = project.sizes[task_id]
    prompt = {
        "type": kind,
        "from_name": control,
        "to_name": "image",
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
        "value": value,
        **flags,
    }
    answer = label_studio.api.interactive(project.ml_id, task_id, {"result": [prompt]})
    assert "errors" not in answer, answer
    data = answer["data"]
    assert data["model_version"] == model_version
    (region,) = data["result"]
    # The config's first mask control offering the label receives the mask.
    assert region["from_name"] == "brush" and region["type"] == "brushlabels"
    assert region["value"]["brushlabels"] == value[kind]
    _check_region(region, size, f"interactive {kind} on task {task_id}")


def test_submitted_annotation_reaches_the_backend_webhook(
    label_studio: LabelStudio, backend_server: BackendServer, project: PreannotatedProject
) -> None:
    task_id = project.tasks[0]["id"]
    before = backend_server.metric("gsb_webhook_events_total", action="ANNOTATION_CREATED")
    accepted = copy.deepcopy(_single_prediction(label_studio, task_id)["result"])
    label_studio.api.create_annotation(task_id, accepted)
    deadline = time.monotonic() + 30
    while backend_server.metric("gsb_webhook_events_total", action="ANNOTATION_CREATED") <= before:
        assert time.monotonic() < deadline, "the backend's /webhook never saw ANNOTATION_CREATED"
        time.sleep(0.5)


def _mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(mask, dtype=np.uint8).tobytes()).hexdigest()


def _export_coco(*args: str) -> None:
    command = [sys.executable, "-m", "backend.cli", "export-coco", *args]
    ran = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_export_coco_reads_label_studio_export_losslessly(
    label_studio: LabelStudio, project: PreannotatedProject, model_version: str, tmp_path: Path
) -> None:
    api = label_studio.api
    # The annotator accepts every prediction as it is (tasks annotated earlier keep theirs).
    for task in api.list_tasks(project.id):
        if not task.get("total_annotations"):
            api.create_annotation(task["id"], copy.deepcopy(_single_prediction(label_studio, task["id"])["result"]))
    # The export the UI's Export button downloads (it carries prediction ids only, not their regions).
    exported = api.request(
        "GET", f"/api/projects/{project.id}/export", params={"exportType": "JSON", "download_all_tasks": "true"}
    )
    assert sorted(task["id"] for task in exported) == sorted(project.sizes)
    export_path, config_path = tmp_path / "export.json", tmp_path / "config.xml"
    export_path.write_text(json.dumps(exported))
    config_path.write_text(LABEL_CONFIG)
    instances_path = tmp_path / "instances.json"
    _export_coco(str(export_path), "--label-config", str(config_path), "-o", str(instances_path))

    coco = COCO(str(instances_path))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert list(names.values()) == list(LABELS)
    assert {img["id"]: (img["width"], img["height"]) for img in coco.loadImgs(coco.getImgIds())} == project.sizes
    assert {img["id"]: img["file_name"] for img in coco.loadImgs(coco.getImgIds())} == project.files
    for task in exported:
        (annotation,) = task["annotations"]
        regions = annotation["result"]
        objects = coco.loadAnns(coco.getAnnIds(imgIds=[task["id"]]))
        assert len(objects) == len(regions), f"task {task['id']}: one COCO object per region"
        # Brush and bitmask masks come out as RLE: the exact pixels Label Studio stored.
        stored = sorted(
            (r["value"][r["type"]][0], _mask_digest(decode_region_mask(r)))
            for r in regions
            if r["from_name"] in MASK_CONTROLS
        )
        exported_masks = sorted(
            (names[o["category_id"]], _mask_digest(coco.annToMask(o)))
            for o in objects
            if isinstance(o["segmentation"], dict)
        )
        assert exported_masks == stored, f"task {task['id']}: exported masks differ from the stored ones"

    # Predictions with their regions come from the live project; the instances read there must
    # be the same dataset as the file export's.
    live_path, results_path = tmp_path / "instances-live.json", tmp_path / "results.json"
    _export_coco(
        "--ls-url", label_studio.url, "--api-key", label_studio.token, "--project", str(project.id),
        "-o", str(live_path), "--predictions", str(results_path), "--model-version", model_version,
    )  # fmt: skip
    live = json.loads(live_path.read_text())
    assert (live["images"], live["annotations"]) == (coco.dataset["images"], coco.dataset["annotations"])
    results = coco.loadRes(str(results_path))
    predicted = {task["id"]: len(_single_prediction(label_studio, task["id"])["result"]) for task in exported}
    assert {tid: len(results.getAnnIds(imgIds=[tid])) for tid in predicted} == predicted
