"""The whole backend on tiny random GroundingDINO + SAM, loaded through the settings a user sets.

Random weights make detections arbitrary, so thresholds are 0 and the count is capped: the
test checks that every stage runs and the output is well-formed for every region type, not
what was found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.regions import decode_region_mask
from tests.conftest import check_every_region_type, every_region_type_config, image_task, ready_app
from tests.tiny_models import build_tiny_grounding_dino
from tests.tiny_sam_models import build_tiny_sam

CONFIG = every_region_type_config()


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return build_tiny_grounding_dino(root / "gdino"), build_tiny_sam(root / "sam")


@pytest.fixture(scope="module")
def client(tiny_model_dirs):
    detector_dir, segmenter_dir = tiny_model_dirs
    environ = {
        "DETECTOR_MODEL": str(detector_dir),
        "SEGMENTER_MODEL": str(segmenter_dir),
        "BOX_THRESHOLD": "0",
        "TEXT_THRESHOLD": "0",
        "MAX_DETECTIONS": "4",
    }
    return ready_app(environ).test_client()


def test_predict_returns_every_region_type_from_real_loaded_models(client) -> None:
    width, height = 96, 64
    response = client.post(
        "/predict", json={"tasks": [image_task(1, width, height)], "label_config": CONFIG, "project": "1.1"}
    )
    assert response.status_code == 200, response.json
    item = response.json["results"][0]
    regions = item["result"]
    check_every_region_type(regions, width, height)
    assert len([r for r in regions if r["type"] == "rectanglelabels"]) <= 4
    setup = client.post("/setup", json={"schema": CONFIG, "project": "1.1"}).json
    assert item["model_version"] == setup["model_version"]


def test_click_on_real_models_returns_one_mask(client) -> None:
    click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 96,
             "original_height": 64, "image_rotation": 0, "is_positive": True,
             "value": {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": ["cat"]}}
    body = {"tasks": [image_task(2, 96, 64)], "label_config": CONFIG, "project": "1.1",
            "params": {"context": {"result": [click]}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    regions = response.json["results"][0]["result"]
    assert len(regions) <= 1
    for region in regions:
        assert region["from_name"] == "brush" and region["value"]["brushlabels"] == ["cat"]
        assert np.asarray(decode_region_mask(region)).shape == (64, 96)
