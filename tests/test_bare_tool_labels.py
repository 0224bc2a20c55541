"""A bare drawing tool with a separate ``<Labels>`` tag (``<Bitmask>`` + ``<Labels>``): parsed as an
output, written as Label Studio's two results per region (tool result + labels result sharing an
``id``, as the editor's ``Result.serialize`` writes them), read back as one labelled region.

Payloads are checked exactly, and against label_studio_sdk's ``validate_prediction``: the check
Label Studio 1.23 runs on imported predictions when prediction validation is on.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from pycocotools import mask as coco_mask

from backend import coco
from backend.config import Settings
from backend.labeling import LabelConfigError, parse_label_config
from backend.predictor import Credentials
from backend.regions import (
    Instance,
    decode_region_mask,
    encode_bitmask_png,
    encode_brush_rle,
    encode_instance,
    join_split_results,
)
from tests.conftest import build_predictor, data_uri, wait_for_models
from tests.fakes import BoxDetector, BoxFillSegmenter, ShapeSegmenter

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Labels name="label" toName="image" model_score_threshold="0.2">
    <Label value="cat" hint="kitty"/><Label value="dog"/><Label value="object"/>
  </Labels>
  <Bitmask name="mask" toName="image"/>
  <Brush name="brush" toName="image" model_score_threshold="0.5"/>
  <Polygon name="poly" toName="image"/>
  <Rectangle name="rect" toName="image" model_skip="true"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>"""
BITMASK_ONLY = """<View>
  <Image name="image" value="$image"/>
  <Labels name="label" toName="image"><Label value="cat"/><Label value="dog"/><Label value="object"/></Labels>
  <Bitmask name="mask" toName="image"/>
  <KeyPoint name="click" toName="image" smart="true"/>
</View>"""
WIDTH, HEIGHT = 8, 6


def square(x0: int, y0: int, x1: int, y1: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def ring() -> np.ndarray:
    """A square with a hole: what polygons cannot hold and a bitmask must keep."""
    mask = square(1, 1, 7, 6)
    mask[2:4, 3:5] = False
    return mask


def valid(config: str, results: list[dict[str, Any]]) -> list[str]:
    return LabelInterface(config).validate_prediction({"result": results}, return_errors=True)


def png(width: int, height: int, draw: dict[tuple[int, int, int, int], tuple[int, int, int]] | None = None) -> str:
    pixels = np.zeros((height, width, 3), np.uint8)
    for (x0, y0, x1, y1), colour in (draw or {}).items():
        pixels[y0:y1, x0:x1] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return data_uri(buffer.getvalue())


# ----------------------------------------------------------------------------- parse


def test_bare_tools_with_labels_are_outputs_of_the_matching_labels_type() -> None:
    project = parse_label_config(CONFIG)
    assert [(c.name, c.type, c.labels_name, c.shape_type) for c in project.all_outputs] == [
        ("mask", "bitmasklabels", "label", "bitmask"),
        ("brush", "brushlabels", "label", "brush"),
        ("poly", "polygonlabels", "label", "polygon"),
        ("rect", "rectanglelabels", "label", "rectangle"),
    ]
    assert [c.name for c in project.skipped_outputs] == ["rect"]  # the tool's own model_skip
    # the tool's own model_score_threshold wins over the <Labels> one
    assert [c.score_threshold for c in project.outputs] == [0.2, 0.5, 0.2]
    assert project.label_values() == ("cat", "dog", "object")
    assert project.prompts_by_label()["cat"] == ("kitty",)
    assert [c.name for c in project.mask_outputs_for("dog")] == ["mask", "brush", "poly"]


def test_a_bare_tool_without_labels_is_refused_naming_both_supported_forms() -> None:
    config = '<View><Image name="image" value="$image"/><Bitmask name="mask" toName="image"/></View>'
    with pytest.raises(LabelConfigError) as refused:
        parse_label_config(config)
    message = str(refused.value)
    assert "<BitmaskLabels>" in message and "<Bitmask>" in message and "<Labels>" in message


def test_labels_on_another_image_do_not_label_the_tool() -> None:
    config = """<View><Image name="image" value="$image"/><Image name="other" value="$other"/>
      <Labels name="label" toName="other"><Label value="cat"/></Labels>
      <Bitmask name="mask" toName="image"/><BrushLabels name="b" toName="image"><Label value="dog"/></BrushLabels>
    </View>"""
    assert [(c.name, c.labels_name) for c in parse_label_config(config).outputs] == [("b", None)]


# ----------------------------------------------------------------------------- encode


def test_bitmask_region_is_the_editors_pair_of_results_exactly() -> None:
    control = parse_label_config(BITMASK_ONLY).outputs[0]
    mask = ring()
    tool, labels = encode_instance(Instance("cat", 0.87654, (1, 1, 7, 6), mask), control, WIDTH, HEIGHT)
    url = encode_bitmask_png(mask)
    common = {"id": tool["id"], "to_name": "image", "original_width": WIDTH, "original_height": HEIGHT,
              "image_rotation": 0, "score": 0.8765}
    assert tool == {**common, "from_name": "mask", "type": "bitmask", "value": {"imageDataURL": url}}
    assert labels == {**common, "from_name": "label", "type": "labels",
                      "value": {"imageDataURL": url, "labels": ["cat"]}}
    assert valid(BITMASK_ONLY, [tool, labels]) == []


@pytest.mark.parametrize(
    ("name", "geometry"),
    [
        ("mask", {"imageDataURL": encode_bitmask_png(square(2, 1, 5, 4))}),
        ("brush", {"format": "rle", "rle": encode_brush_rle(square(2, 1, 5, 4))}),
        # percentages as the encoder computes them (pixels / size * 100), so equality is exact
        ("poly", {"points": [[25.0, 1 / 6 * 100], [25.0, 4 / 6 * 100], [62.5, 4 / 6 * 100], [62.5, 1 / 6 * 100]],
                  "closed": True}),
        ("rect", {"x": 25.0, "y": 1 / 6 * 100, "width": 37.5, "height": 50.0, "rotation": 0}),
    ],
)
def test_every_tool_gives_a_valid_pair_that_reads_back_as_its_labelled_region(
    name: str, geometry: dict[str, Any]
) -> None:
    control = next(c for c in parse_label_config(CONFIG).all_outputs if c.name == name)
    results = encode_instance(Instance("dog", 0.5, (2, 1, 5, 4), square(2, 1, 5, 4)), control, WIDTH, HEIGHT)
    assert [(r["from_name"], r["type"], r["value"]) for r in results] == [
        (name, control.shape_type, geometry),
        ("label", "labels", {**geometry, "labels": ["dog"]}),
    ]
    assert results[0]["id"] == results[1]["id"]
    assert valid(CONFIG, results) == []
    (joined,) = join_split_results(results)
    assert joined == {**results[0], "type": control.type, "value": {**geometry, control.type: ["dog"]}}
    assert np.array_equal(decode_region_mask(joined), square(2, 1, 5, 4))


def test_polygon_parts_are_one_pair_each() -> None:
    control = next(c for c in parse_label_config(CONFIG).outputs if c.name == "poly")
    two_parts = square(0, 0, 2, 2) | square(5, 3, 8, 6)
    results = encode_instance(Instance("cat", 0.5, (0, 0, 8, 6), two_parts), control, WIDTH, HEIGHT)
    assert [r["type"] for r in results] == ["polygon", "labels", "polygon", "labels"]
    assert results[0]["id"] == results[1]["id"] != results[2]["id"] == results[3]["id"]
    assert valid(CONFIG, results) == []


def test_join_keeps_other_results_and_marks_an_unlabelled_tool_region() -> None:
    url = encode_bitmask_png(square(0, 0, 2, 2))
    size = {"to_name": "image", "original_width": WIDTH, "original_height": HEIGHT}
    results = [
        {"id": "t", "from_name": "mask", "type": "bitmask", "value": {"imageDataURL": url}, **size},
        {"id": "c", "from_name": "choice", "type": "choices", "value": {"choices": ["x"]}},
        {"id": "s", "from_name": "spans", "type": "labels", "value": {"start": 0, "end": 2, "labels": ["cat"]}},
        {"id": "u", "from_name": "brush", "type": "brush", "value": {"format": "rle", "rle": [0, 0, 0, 0]}, **size},
        {"id": "t", "from_name": "label", "type": "labels", "value": {"imageDataURL": url, "labels": ["cat"]}, **size},
    ]
    assert join_split_results(results) == [
        {**results[0], "type": "bitmasklabels", "value": {"imageDataURL": url, "bitmasklabels": ["cat"]}},
        results[1],
        results[2],  # a labels result without a tool partner is not a region of this image
        {**results[3], "type": "brushlabels", "value": {"format": "rle", "rle": [0, 0, 0, 0], "brushlabels": []}},
    ]


# ----------------------------------------------------------------------------- pipelines


def test_preannotation_writes_pairs_that_label_studio_validates() -> None:
    detector = BoxDetector({"kitty": [((10.0, 5.0, 30.0, 20.0), 0.9)]})  # the <Labels> Label's hint
    predictor = build_predictor(Settings(), detector, BoxFillSegmenter())
    task = {"id": 1, "data": {"image": png(40, 30)}}
    item = predictor.predict_tasks([task], CONFIG, Credentials())[0]
    results = item["result"]
    assert [(r["from_name"], r["type"]) for r in results] == [
        ("mask", "bitmask"), ("label", "labels"), ("brush", "brush"), ("label", "labels"),
        ("poly", "polygon"), ("label", "labels"),
    ]
    assert all(r["value"].get("labels", ["cat"]) == ["cat"] for r in results)
    assert valid(CONFIG, results) == []
    expected = square(10, 5, 30, 20, 40, 30)
    assert all(np.array_equal(decode_region_mask(r), expected) for r in join_split_results(results))
    assert item["score"] == pytest.approx(0.81)


def test_everything_mode_writes_pairs_under_the_catch_all_label() -> None:
    settings = Settings(points_per_side=8, unlabeled_label="object")
    predictor = build_predictor(settings, BoxDetector({}), ShapeSegmenter())
    red, blue = (4, 4, 20, 16), (24, 10, 36, 28)
    task = {"id": 1, "data": {"image": png(40, 30, {red: (255, 0, 0), blue: (0, 0, 255)})}}
    results = predictor.predict_tasks([task], BITMASK_ONLY, Credentials(), mode="everything")[0]["result"]
    assert [r["type"] for r in results] == ["bitmask", "labels", "bitmask", "labels"]
    assert valid(BITMASK_ONLY, results) == []
    joined = join_split_results(results)
    assert [r["value"]["bitmasklabels"] for r in joined] == [["object"], ["object"]]
    found = sorted((decode_region_mask(r) for r in joined), key=lambda m: int(np.argmax(m.any(axis=0))))
    assert [np.array_equal(m, square(*box, 40, 30)) for m, box in zip(found, (red, blue), strict=True)] == [True, True]


def _click(make_client, context_items: list[dict], extra_task: dict | None = None) -> list[dict]:
    client, _ = make_client(Settings(), BoxDetector({}), BoxFillSegmenter())
    wait_for_models(client, 10)
    task = {"id": 7, "data": {"image": png(64, 48)}, **(extra_task or {})}
    body = {"tasks": [task], "project": "1.1", "label_config": BITMASK_ONLY,
            "params": {"context": {"result": context_items}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    return response.json["results"][0]["result"]


def _bare_click(x: float, y: float, label: str, rid: str = "k1") -> list[dict]:
    """What Label Studio sends for a bare smart <KeyPoint> click with a <Labels> label selected."""
    size = {"to_name": "image", "original_width": 64, "original_height": 48, "image_rotation": 0}
    point = {"x": x, "y": y, "width": 0.5}
    return [
        {"id": rid, "from_name": "click", "type": "keypoint", "value": point, "is_positive": True, **size},
        {"id": rid, "from_name": "label", "type": "labels", "value": {**point, "labels": [label]}, **size},
    ]


def test_a_click_answers_the_pair_with_the_label_of_the_labels_item(make_client) -> None:
    tool, labels = _click(make_client, _bare_click(50.0, 25.0, "dog"))
    assert [(r["from_name"], r["type"]) for r in (tool, labels)] == [("mask", "bitmask"), ("label", "labels")]
    assert tool["id"] == labels["id"] and labels["value"]["labels"] == ["dog"]
    assert labels["value"]["imageDataURL"] == tool["value"]["imageDataURL"]
    assert np.array_equal(decode_region_mask(tool), square(32 - 5, 12 - 5, 32 + 6, 12 + 6, 64, 48))
    assert valid(BITMASK_ONLY, [tool, labels]) == []


def test_a_click_inside_a_predicted_pair_refines_that_mask(make_client) -> None:
    control = parse_label_config(BITMASK_ONLY).outputs[0]
    stored = encode_instance(Instance("dog", 0.9, (8, 8, 40, 30), square(8, 8, 40, 30, 64, 48)), control, 64, 48)
    tool, _ = _click(make_client, _bare_click(25.0, 25.0, "dog"), {"predictions": [{"result": stored}]})
    # BoxFillSegmenter fills the prior region's box, then the click's square: the stored mask seeded SAM
    assert decode_region_mask(tool)[8:30, 8:40].all()


# ----------------------------------------------------------------------------- COCO


def _pair(rid: str, tool_name: str, kind: str, geometry: dict, label: str, width: int, height: int) -> list[dict]:
    size = {"to_name": "image", "original_width": width, "original_height": height, "image_rotation": 0}
    return [
        {"id": rid, "from_name": tool_name, "type": kind, "value": geometry, **size},
        {"id": rid, "from_name": "label", "type": "labels", "value": {**geometry, "labels": [label]}, **size},
    ]


def test_coco_export_reads_pairs_and_keeps_the_bitmask_exact() -> None:
    hole = ring()
    results = [
        *_pair("m", "mask", "bitmask", {"imageDataURL": encode_bitmask_png(hole)}, "cat", WIDTH, HEIGHT),
        *_pair("r", "rect", "rectangle", {"x": 0, "y": 0, "width": 25.0, "height": 50.0, "rotation": 0},
               "dog", WIDTH, HEIGHT),
    ]
    tasks = [{"id": 3, "data": {"image": "/data/upload/1/0123abcd-a.png"},
              "annotations": [{"id": 1, "result": results, "was_cancelled": False}],
              "predictions": [{"id": 2, "model_version": "v", "result": results[:2], "score": 0.5}]}]
    dataset = coco.ls_to_coco(tasks, parse_label_config(CONFIG))
    assert dataset["categories"] == [{"id": 1, "name": "cat", "supercategory": ""},
                                     {"id": 2, "name": "dog", "supercategory": ""},
                                     {"id": 3, "name": "object", "supercategory": ""}]
    bitmask, box = dataset["annotations"]
    assert (bitmask["category_id"], bitmask["area"]) == (1, int(hole.sum()))
    assert np.array_equal(coco_mask.decode(bitmask["segmentation"]).astype(bool), hole)
    assert (box["category_id"], box["bbox"], box["area"]) == (2, [0.0, 0.0, 2.0, 3.0], 6)
    assert [c["name"] for c in coco.categories(tasks)] == ["cat", "dog"]  # without a config: the labels seen
    (result,) = coco.ls_to_coco_results(tasks, parse_label_config(CONFIG))
    assert (result["category_id"], result["score"]) == (1, 0.5)
    assert np.array_equal(coco_mask.decode(result["segmentation"]).astype(bool), hole)


def test_coco_import_writes_pairs_and_round_trips() -> None:
    config = parse_label_config(BITMASK_ONLY)
    hole = ring()
    results = _pair("m", "mask", "bitmask", {"imageDataURL": encode_bitmask_png(hole)}, "dog", WIDTH, HEIGHT)
    tasks = [{"id": 3, "data": {"image": "/data/upload/1/0123abcd-a.png"},
              "annotations": [{"id": 1, "result": results, "was_cancelled": False}]}]
    dataset = coco.ls_to_coco(tasks, config)
    (imported,) = coco.coco_to_ls(dataset, config, as_annotations=True)
    regions = imported["annotations"][0]["result"]
    assert [(r["from_name"], r["type"]) for r in regions] == [("mask", "bitmask"), ("label", "labels")]
    assert valid(BITMASK_ONLY, regions) == []
    assert coco.ls_to_coco([{**imported, "id": 3}], config)["annotations"] == dataset["annotations"]
