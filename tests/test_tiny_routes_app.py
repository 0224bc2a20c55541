"""The whole HTTP app on every other detector/segmenter pairing of the grounded-sam route:
OWLv2 + SAM, MM-GroundingDINO + SAM, GroundingDINO + SAM-HQ and GroundingDINO + SAM 2 (SAM 2
also answering clicks), each on tiny random checkpoints the tests save and the app loads
through the settings a user sets (``DETECTOR_MODEL``, ``SEGMENTER_MODEL``, ``CLIP_MODEL``,
``CLIPSEG_MODEL``). GroundingDINO + SAM is test_tiny_models_app.py, SAM 3 test_sam3.py.

Random weights make detections arbitrary, so thresholds are 0 and the count is capped: the
tests check that every stage runs on every model family and the output is well-formed for
every region type, not what was found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from backend.regions import decode_region_mask
from tests.conftest import check_every_region_type, every_region_type_config, image_task, keypoint, ready_app
from tests.tiny_clip_models import build_tiny_clip, build_tiny_clipseg
from tests.tiny_models import build_tiny_grounding_dino, build_tiny_mm_grounding_dino, build_tiny_owlv2
from tests.tiny_sam_models import build_tiny_sam, build_tiny_sam2, build_tiny_sam_hq

CONFIG = every_region_type_config()
WIDTH, HEIGHT = 96, 64
MAX_DETECTIONS = 4
Builder = Callable[[Path], Path]

ROUTES: dict[str, tuple[Builder, Builder]] = {
    "owlv2+sam": (build_tiny_owlv2, build_tiny_sam),
    "mm-grounding-dino+sam": (build_tiny_mm_grounding_dino, build_tiny_sam),
    "grounding-dino+sam-hq": (build_tiny_grounding_dino, build_tiny_sam_hq),
    "grounding-dino+sam2": (build_tiny_grounding_dino, build_tiny_sam2),
}


@dataclass(frozen=True)
class RouteApp:
    client: FlaskClient
    models: dict[str, str]  # role -> the folder the setting names


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clip")
    return build_tiny_clip(root / "clip"), build_tiny_clipseg(root / "clipseg")


@pytest.fixture(scope="module", params=list(ROUTES))
def route(request, tmp_path_factory, clip_dirs) -> RouteApp:
    """One app per pairing, loaded once for all the tests of that pairing."""
    build_detector, build_segmenter = ROUTES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    models = {
        "detector": str(build_detector(root / "detector")),
        "segmenter": str(build_segmenter(root / "segmenter")),
        "clip": str(clip_dirs[0]),
        "clipseg": str(clip_dirs[1]),
    }
    environ = {
        "DETECTOR_MODEL": models["detector"],
        "SEGMENTER_MODEL": models["segmenter"],
        "CLIP_MODEL": models["clip"],
        "CLIPSEG_MODEL": models["clipseg"],
        "BOX_THRESHOLD": "0",
        "TEXT_THRESHOLD": "0",
        "MAX_DETECTIONS": str(MAX_DETECTIONS),
    }
    return RouteApp(ready_app(environ).test_client(), models)


def _task() -> dict:
    return image_task(1, WIDTH, HEIGHT)  # one image: the click below reuses its cached embedding


def test_health_and_setup_name_the_route_and_every_configured_model(route: RouteApp) -> None:
    health = route.client.get("/health").json
    assert health["model_state"] == "ready"
    assert health["pipeline"] == "grounded-sam"
    assert health["models"] == route.models  # CLIP and CLIPSeg included once configured
    assert (health["detector"], health["segmenter"]) == (route.models["detector"], route.models["segmenter"])
    setup = route.client.post("/setup", json={"schema": CONFIG, "project": "1.1"}).json
    assert setup["pipeline"] == "grounded-sam" and setup["models"] == route.models
    assert setup["model_version"].startswith("grounded-sam-grounded-")


def test_predict_returns_every_region_type(route: RouteApp) -> None:
    response = route.client.post("/predict", json={"tasks": [_task()], "label_config": CONFIG, "project": "1.1"})
    assert response.status_code == 200, response.json
    item = response.json["results"][0]
    assert "error" not in item, item
    regions = item["result"]
    check_every_region_type(regions, WIDTH, HEIGHT)
    assert len([r for r in regions if r["type"] == "rectanglelabels"]) <= MAX_DETECTIONS
    setup = route.client.post("/setup", json={"schema": CONFIG, "project": "1.1"}).json
    assert item["model_version"] == setup["model_version"]


def test_click_returns_one_mask_of_the_clicked_label(route: RouteApp) -> None:
    click = keypoint(50.0, 50.0, w=WIDTH, h=HEIGHT)
    body = {"tasks": [_task()], "label_config": CONFIG, "project": "1.1", "params": {"context": {"result": [click]}}}
    response = route.client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    regions = response.json["results"][0]["result"]
    assert len(regions) == 1  # these seeded random weights give a non-empty mask for this click
    region = regions[0]
    assert region["from_name"] == "brush" and region["value"]["brushlabels"] == ["cat"]
    mask = decode_region_mask(region)
    assert mask.shape == (HEIGHT, WIDTH) and mask.any()
