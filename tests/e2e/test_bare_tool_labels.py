"""A bare tool with a separate ``<Labels>`` (``<Bitmask>`` + ``<Labels>``) in the real Label Studio:
the project accepts the config, the backend's pre-annotations and click answers are stored as
Label Studio's two results per region, a prediction and an annotation in that form are stored
as sent, and ``export-coco`` reads Label Studio's own JSON export back pixel for pixel.

Every stored result list is also checked with label_studio_sdk's ``validate_prediction``, the
check Label Studio 1.23 runs on imported predictions when its prediction validation flag
(``fflag_feat_utc_210_prediction_validation_15082025``) is on; it is off by default.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from pycocotools import mask as coco_mask

from backend import coco
from backend.labeling import parse_label_config
from backend.regions import Instance, decode_region_mask, encode_instance, join_split_results

from .backend_server import BackendServer
from .conftest import LabelStudio
from .grounded_project import LABELS, PreannotatedProject, create_preannotated_project

pytestmark = pytest.mark.e2e

_LABEL_TAGS = "".join(f'<Label value="{label}"/>' for label in LABELS)
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <Labels name="label" toName="image">{_LABEL_TAGS}</Labels>
  <Bitmask name="mask" toName="image"/>
  <Rectangle name="rect" toName="image"/>
  <KeyPoint name="click" toName="image" smart="true"/>
</View>"""
TOOL_TYPES = {"mask": "bitmask", "rect": "rectangle"}


@pytest.fixture(scope="module")
def project(
    label_studio: LabelStudio, backend_server: BackendServer, tmp_path_factory: pytest.TempPathFactory
) -> PreannotatedProject:
    return create_preannotated_project(
        label_studio.api, backend_server.url, tmp_path_factory.mktemp("images"), "bare tools + labels", CONFIG
    )


def _check_pairs(results: list[dict[str, Any]], size: tuple[int, int], where: str) -> list[dict[str, Any]]:
    """Every region is a tool result followed by its labels result (one id, one geometry, a
    config label), Label Studio's validator accepts the list, and the joined regions decode
    at the image size; returns the joined regions."""
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_id[result["id"]].append(result)
    for rid, (tool, labels) in by_id.items():
        assert (tool["type"], labels["from_name"], labels["type"]) == (TOOL_TYPES[tool["from_name"]], "label", "labels")
        assert labels["value"] == {**tool["value"], "labels": labels["value"]["labels"]}, f"{where}: {rid}"
        assert len(labels["value"]["labels"]) == 1 and labels["value"]["labels"][0] in LABELS, f"{where}: {rid}"
    assert LabelInterface(CONFIG).validate_prediction({"result": results}, return_errors=True) == [], where
    joined = join_split_results(results)
    assert len(joined) == len(by_id), where
    width, height = size
    for region in joined:
        assert decode_region_mask(region).shape == (height, width), f"{where}: {region['id']}"
    return joined


def test_preannotations_are_stored_as_tool_and_labels_pairs(
    label_studio: LabelStudio, project: PreannotatedProject
) -> None:
    for task in project.tasks:
        (prediction,) = label_studio.api.predictions(task["id"])
        where = f"task {task['id']} ({project.files[task['id']]})"
        joined = _check_pairs(prediction["result"], project.sizes[task["id"]], where)
        # thresholds 0 on random weights: both tools get regions
        assert {region["from_name"] for region in joined} == set(TOOL_TYPES), where


def test_a_bare_smart_click_is_answered_with_a_bitmask_pair(
    label_studio: LabelStudio, project: PreannotatedProject
) -> None:
    task_id = project.tasks[0]["id"]
    width, height = project.sizes[task_id]
    size = {"to_name": "image", "original_width": width, "original_height": height, "image_rotation": 0}
    point = {"x": 40.0, "y": 50.0, "width": 0.5}
    click = [  # what the labeling page sends for a smart <KeyPoint> click with "dog" selected in <Labels>
        {"id": "c1", "from_name": "click", "type": "keypoint", "value": point, "is_positive": True, **size},
        {"id": "c1", "from_name": "label", "type": "labels", "value": {**point, "labels": ["dog"]}, **size},
    ]
    answer = label_studio.api.interactive(project.ml_id, task_id, {"result": click})
    assert "errors" not in answer, answer
    results = answer["data"]["result"]
    assert [(r["from_name"], r["type"]) for r in results] == [("mask", "bitmask"), ("label", "labels")]
    (region,) = _check_pairs(results, (width, height), f"click on task {task_id}")
    assert region["value"]["bitmasklabels"] == ["dog"]


def test_a_stored_pair_comes_back_as_sent_and_exports_exactly(
    label_studio: LabelStudio, project: PreannotatedProject
) -> None:
    api = label_studio.api
    task_id = project.tasks[1]["id"]
    width, height = project.sizes[task_id]
    ring = np.zeros((height, width), bool)
    ring[5:30, 6:40] = True
    ring[10:20, 15:25] = False  # a hole: polygons would lose it, the bitmask keeps it
    control = parse_label_config(CONFIG).outputs[0]
    results = encode_instance(Instance("cat", 0.88, (6, 5, 40, 30), ring), control, width, height)

    stored = api.request(
        "POST", "/api/predictions/", json={"task": task_id, "result": results, "score": 0.88, "model_version": "pair"}
    )
    assert next(p for p in api.predictions(task_id) if p["id"] == stored["id"])["result"] == results
    api.create_annotation(task_id, results)

    exported = api.request("GET", f"/api/projects/{project.id}/export", params={"exportType": "JSON"})
    (task,) = [t for t in exported if t["id"] == task_id]
    assert task["annotations"][0]["result"] == results
    dataset = coco.ls_to_coco([task], parse_label_config(CONFIG))
    (instance,) = dataset["annotations"]
    assert dataset["categories"][instance["category_id"] - 1]["name"] == "cat"
    assert np.array_equal(coco_mask.decode(instance["segmentation"]).astype(bool), ring)
