"""A project that draws only rectangles gets the detector's boxes, without SAM."""

from __future__ import annotations

import pytest

from backend.config import Settings
from tests.conftest import image_task, wait_for_models
from tests.fakes import BoxDetector, BoxFillSegmenter

RECTANGLES_ONLY = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels></View>"""
RECTANGLES_AND_BRUSH = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="cat"/></BrushLabels></View>"""
CAT_BOX = ((10.0, 20.0, 50.0, 60.0), 0.8)


def _predict(make_client, config: str, mode: str = "grounded"):
    segmenter = BoxFillSegmenter(score=0.5)
    client, _ = make_client(Settings(prediction_mode=mode), BoxDetector({"cat": [CAT_BOX]}), segmenter)
    wait_for_models(client, 10)
    body = {"tasks": [image_task(1, 100, 80)], "label_config": config, "params": {"context": None}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    return response.json["results"][0], segmenter


def test_rectangle_only_project_skips_sam_and_keeps_the_detector_box_and_score(make_client) -> None:
    item, segmenter = _predict(make_client, RECTANGLES_ONLY)
    assert segmenter.embed_calls == 0 and segmenter.segment_calls == []
    [region] = item["result"]
    value = region["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == pytest.approx((10.0, 25.0, 40.0, 50.0))
    assert region["score"] == pytest.approx(0.8)  # no SAM IoU to multiply by


def test_a_mask_output_still_runs_sam_and_scores_with_its_iou(make_client) -> None:
    item, segmenter = _predict(make_client, RECTANGLES_AND_BRUSH)
    assert segmenter.embed_calls == 1 and len(segmenter.segment_calls) == 1
    scores = {region["type"]: region["score"] for region in item["result"]}
    assert scores == pytest.approx({"rectanglelabels": 0.4, "brushlabels": 0.4})


def test_smart_tags_keep_sam_running_so_the_first_click_is_warm(make_client) -> None:
    smart = RECTANGLES_ONLY.replace(
        "</View>",
        '<KeyPointLabels name="kp" toName="image" smart="true">'
        '<Label value="cat" smart="true"/></KeyPointLabels></View>',
    )
    item, segmenter = _predict(make_client, smart)
    assert segmenter.embed_calls == 1
    [region] = item["result"]
    assert region["type"] == "rectanglelabels" and region["score"] == pytest.approx(0.4)


def test_the_mode_is_compared_normalised_so_one_version_means_one_output(make_client) -> None:
    item, segmenter = _predict(make_client, RECTANGLES_ONLY, mode=" Grounded ")
    assert segmenter.embed_calls == 0
    assert item["result"][0]["score"] == pytest.approx(0.8)
