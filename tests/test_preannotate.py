"""Pre-annotation pipeline logic and exact geometry, on the test-only fake models."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache
from backend.labeling import parse_label_config
from backend.models.base import Detection
from backend.pipelines.preannotate import (
    PhraseTable,
    PreannotateParams,
    preannotate,
    select_detections,
    suppress_overlapping_masks,
)
from backend.predictor import Credentials
from backend.regions import Instance, decode_region_mask
from tests.conftest import CONFIG_ALL_OUTPUTS, build_predictor, data_uri
from tests.fakes import BoxDetector, BoxFillSegmenter


def test_phrase_table_maps_every_phrase_to_its_label_once() -> None:
    table = PhraseTable.from_labels({"vehicle": ("car", "truck"), "auto": ("Car", "van"), "cat": ("cat",)})
    assert table.phrases == ("car", "truck", "van", "cat")
    assert table.labels == ("vehicle", "vehicle", "auto", "cat")


def test_selection_applies_label_thresholds_nms_and_cross_label_dedup() -> None:
    table = PhraseTable(("cat", "dog"), ("cat", "dog"))
    detections = [
        Detection((0, 0, 10, 10), 0.9, 0),
        Detection((1, 0, 11, 10), 0.8, 0),  # same cat, lower score: class NMS drops it
        Detection((0, 0, 10, 10), 0.85, 1),  # dog claims the same box: cross-label dedup drops it
        Detection((50, 50, 60, 60), 0.35, 1),  # below dog's own threshold 0.4
        Detection((30, 30, 40, 40), 0.5, 1),
        Detection((20, 20, 30, 30), 0.95, 5),  # prompt index out of range: never a default label
    ]
    params = PreannotateParams(box_threshold=0.3, label_thresholds={"dog": 0.4}, nms_iou=0.5)
    selected = select_detections(detections, table, params)
    assert [(det.box, label) for det, label in selected] == [((0, 0, 10, 10), "cat"), ((30, 30, 40, 40), "dog")]
    capped = select_detections(detections, table, PreannotateParams(max_detections=1))
    assert len(capped) == 1 and capped[0][1] == "cat"


def test_mask_suppression_keeps_best_of_overlapping_masks() -> None:
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = a.copy()
    b[5, 0] = True
    c = np.zeros((10, 10), bool)
    c[8:] = True
    instances = [Instance("dog", 0.5, (0, 0, 10, 6), b), Instance("cat", 0.9, (0, 0, 10, 5), a),
                 Instance("cat", 0.4, (0, 8, 10, 10), c)]
    kept = suppress_overlapping_masks(instances, 0.9)
    assert [(i.label, i.score) for i in kept] == [("cat", 0.9), ("cat", 0.4)]
    assert suppress_overlapping_masks(instances, 0.0) == instances


def test_embedding_is_computed_once_per_image_and_boxes_go_in_one_call() -> None:
    detector = BoxDetector({"cat": [((0, 0, 10, 10), 0.9), ((20, 20, 30, 30), 0.8)], "dog": [((40, 5, 60, 25), 0.7)]})
    segmenter = BoxFillSegmenter()
    cache = EmbeddingCache(max_bytes=10**8)
    image = Image.new("RGB", (64, 48))
    for _ in range(2):
        instances = preannotate(image, "sha-1", {"cat": ("cat",), "dog": ("dog",)}, detector, segmenter, cache,
                                PreannotateParams())
    assert segmenter.embed_calls == 1
    assert len(segmenter.segment_calls[0]) == 3
    assert detector.calls[0] == ("cat", "dog")
    assert sorted(i.label for i in instances) == ["cat", "cat", "dog"]


def _predict_one(image_bytes: bytes, boxes: dict, config: str = CONFIG_ALL_OUTPUTS) -> dict:
    predictor = build_predictor(Settings(), BoxDetector(boxes), BoxFillSegmenter())
    task = {"id": 1, "data": {"image": data_uri(image_bytes)}}
    return predictor.predict_tasks([task], config, Credentials())[0]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("width", "height"), [(640, 480), (480, 640)])
def test_box_becomes_exact_brush_polygon_and_rectangle(width: int, height: int) -> None:
    box = (100.0, 50.0, 300.0, 420.0)
    item = _predict_one(_png(width, height), {"cat": [(box, 0.9)]})
    expected = np.zeros((height, width), bool)
    expected[50:420, 100:300] = True
    by_type = {r["type"]: r for r in item["result"]}
    assert np.array_equal(decode_region_mask(by_type["brushlabels"]), expected)
    rect = by_type["rectanglelabels"]["value"]
    assert rect["x"] == pytest.approx(100 / width * 100)
    assert rect["y"] == pytest.approx(50 / height * 100)
    assert rect["width"] == pytest.approx(200 / width * 100)
    assert rect["height"] == pytest.approx(370 / height * 100)
    points = np.array(by_type["polygonlabels"]["value"]["points"]) / 100 * [width, height]
    assert points[:, 0].min() == pytest.approx(100, abs=1) and points[:, 0].max() == pytest.approx(300, abs=1)
    assert points[:, 1].min() == pytest.approx(50, abs=1) and points[:, 1].max() == pytest.approx(420, abs=1)


def test_exif_rotated_image_gives_regions_in_displayed_orientation() -> None:
    # Stored 200x100 (landscape) with orientation 6: browsers and Label Studio show it 100x200.
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes())
    item = _predict_one(buffer.getvalue(), {"cat": [((10.0, 150.0, 60.0, 190.0), 0.9)]})
    brush = next(r for r in item["result"] if r["type"] == "brushlabels")
    assert (brush["original_width"], brush["original_height"]) == (100, 200)
    mask = decode_region_mask(brush)
    assert mask.shape == (200, 100)
    assert mask[150:190, 10:60].all() and mask.sum() == 50 * 40


def test_labels_go_only_to_controls_that_offer_them_and_score_thresholds_apply() -> None:
    config = """<View><Image name="img" value="$image"/>
      <BrushLabels name="b" toName="img"><Label value="cat"/></BrushLabels>
      <RectangleLabels name="r" toName="img" model_score_threshold="0.5"><Label value="dog"/><Label value="cat"/>
      </RectangleLabels></View>"""
    item = _predict_one(_png(64, 64), {"cat": [((0, 0, 10, 10), 0.9)], "dog": [((20, 20, 40, 40), 0.4)]}, config)
    summary = sorted((r["type"], r["value"][r["type"]][0]) for r in item["result"])
    # the dog box passes the box threshold (0.3) but scores 0.4 x 0.9 < 0.5 on the rectangle control
    assert summary == [("brushlabels", "cat"), ("rectanglelabels", "cat")]


def test_project_number_tags_override_thresholds_and_version() -> None:
    base = CONFIG_ALL_OUTPUTS.replace("</View>", "")
    tuned = base + '<Number name="box_threshold" toName="image" defaultValue="0.85"/></View>'
    predictor = build_predictor(Settings(), BoxDetector({"cat": [((0, 0, 10, 10), 0.8)]}), BoxFillSegmenter())
    task = {"id": 1, "data": {"image": data_uri(_png(32, 32))}}
    plain = predictor.predict_tasks([task], CONFIG_ALL_OUTPUTS, Credentials())[0]
    strict = predictor.predict_tasks([task], tuned, Credentials())[0]
    assert plain["result"] and strict["result"] == []
    assert plain["model_version"] != strict["model_version"]
    assert parse_label_config(tuned).thresholds == {"box_threshold": 0.85}


def test_predicted_values_prompt_the_synonyms_and_store_the_label() -> None:
    config = """<View><Image name="img" value="$image"/>
      <BrushLabels name="b" toName="img"><Label value="vehicle" predicted_values="car,truck,bus"/></BrushLabels>
      </View>"""
    detector = BoxDetector({"truck": [((4, 4, 20, 20), 0.9)]})
    predictor = build_predictor(Settings(), detector, BoxFillSegmenter())
    item = predictor.predict_tasks([{"id": 1, "data": {"image": data_uri(_png(32, 32))}}], config, Credentials())[0]
    assert detector.calls == [("car", "truck", "bus")]
    assert [r["value"]["brushlabels"] for r in item["result"]] == [["vehicle"]]
    assert decode_region_mask(item["result"][0])[4:20, 4:20].all()


def test_model_skip_control_is_left_alone() -> None:
    config = """<View><Image name="img" value="$image"/>
      <BrushLabels name="b" toName="img"><Label value="cat"/></BrushLabels>
      <RectangleLabels name="r" toName="img" model_skip="true"><Label value="cat"/></RectangleLabels></View>"""
    item = _predict_one(_png(32, 32), {"cat": [((0, 0, 10, 10), 0.9)]}, config)
    assert [(r["from_name"], r["type"]) for r in item["result"]] == [("b", "brushlabels")]


class _ThresholdSpy(BoxDetector):
    def __init__(self, boxes: dict) -> None:
        super().__init__(boxes)
        self.thresholds: list[tuple[float, float]] = []

    def detect(self, image, prompts, box_threshold, text_threshold):
        self.thresholds.append((box_threshold, text_threshold))
        return super().detect(image, prompts, box_threshold, text_threshold)


def test_text_threshold_number_tag_reaches_the_detector_and_the_version() -> None:
    tuned = CONFIG_ALL_OUTPUTS.replace(
        "</View>", '<Number name="text_threshold" toName="image" defaultValue="0.6"/></View>'
    )
    detector = _ThresholdSpy({"cat": [((0, 0, 10, 10), 0.8)]})
    predictor = build_predictor(Settings(text_threshold=0.25), detector, BoxFillSegmenter())
    task = {"id": 1, "data": {"image": data_uri(_png(32, 32))}}
    plain = predictor.predict_tasks([task], CONFIG_ALL_OUTPUTS, Credentials())[0]
    strict = predictor.predict_tasks([task], tuned, Credentials())[0]
    assert [t for _, t in detector.thresholds] == [0.25, 0.6]
    assert plain["model_version"] != strict["model_version"]
