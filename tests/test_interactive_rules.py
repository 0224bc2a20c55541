"""Interactive rules found missing by an audit: prefix reads of brush RLE, memory after a box,
one polygon per answer, label and image checks, per-annotator memory."""

from __future__ import annotations

import numpy as np
import pytest

from backend import brush_rle
from backend.labeling import parse_label_config
from backend.pipelines.interactive import InteractiveError, find_existing_mask, parse_context
from backend.regions import Instance, decode_region_mask, encode_instance
from tests.conftest import keypoint
from tests.test_interactive import CONFIG, Harness, rectangle

PROJECT = parse_label_config(CONFIG)


def _bits(value: int, width: int) -> str:
    return format(value, f"0{width}b")


def _stream(tokens: list[tuple[bool, list[int], int]]) -> bytes:
    """A hand-built RLE stream (word 8 bits, length fields 3/4/8/16) from ``(repeat, words,
    length)`` tokens; multi-word literals are what Label Studio's own brush writes and what
    ``encode_runs`` never does."""
    count = sum(length for _, _, length in tokens)
    bits = _bits(count, 32) + _bits(7, 5) + "".join(_bits(size - 1, 4) for size in (3, 4, 8, 16))
    for repeat, words, length in tokens:
        choice = next(i for i, size in enumerate((3, 4, 8, 16)) if length <= 2**size)
        size = (3, 4, 8, 16)[choice]
        bits += ("1" if repeat else "0") + _bits(choice, 2) + _bits(length - 1, size)
        bits += "".join(_bits(word, 8) for word in words)
    bits += "0" * (8 - len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def test_value_at_reads_what_decode_decodes() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((height, width)) > rng.random()
        data = bytes(brush_rle.encode_mask(mask))
        flat = brush_rle.decode(data)
        for index in [0, flat.size - 1, *rng.integers(0, flat.size, 40).tolist()]:
            assert brush_rle.value_at(data, index) == flat[index]
    literal = list(range(1, 8))
    data = _stream([(True, [9], 300), (False, literal, 7), (True, [0], 60000), (False, [5, 6], 2)])
    flat = brush_rle.decode(data)
    assert flat.size == 300 + 7 + 60000 + 2
    assert [brush_rle.value_at(data, i) for i in range(flat.size)] == flat.tolist()


def test_value_at_reads_only_up_to_the_index_and_refuses_bad_streams() -> None:
    mask = np.random.default_rng(0).random((100, 100)) > 0.5
    data = bytes(brush_rle.encode_mask(mask))
    assert len(data) > 1000
    assert brush_rle.value_at(data[:20], 3) == 255 * mask[0, 0]  # the tokens after it are never read
    with pytest.raises(ValueError, match="truncated"):
        brush_rle.value_at(data[:20], 4 * 100 * 100 - 1)
    with pytest.raises(IndexError):
        brush_rle.value_at(data, 4 * 100 * 100)


def test_polygon_regions_are_skipped_only_when_clearly_away_from_the_click() -> None:
    control = parse_label_config(CONFIG.replace("BrushLabels", "PolygonLabels")).outputs[0]
    near = np.zeros((480, 640), bool)
    near[100:200, 321:400] = True  # the clicked pixel x=320 borders it
    inside = np.zeros((480, 640), bool)
    inside[100:200, 300:400] = True
    for mask, expected in ((near, None), (inside, inside)):
        regions = encode_instance(Instance("cat", 0.9, (0, 0, 1, 1), mask), control, 640, 480)
        found = find_existing_mask({"annotations": [{"result": regions}]}, "cat", (320.5, 150.5), 640, 480)
        if expected is None:
            assert found is None
        else:
            assert found is not None and np.array_equal(found, expected)


def test_box_then_box_plus_point_reuses_the_box_answer(make_client) -> None:
    h = Harness(make_client)
    box = rectangle(10, 10, 30, 30)
    h.click([box], task_id=5)
    h.click([box, keypoint(20, 20)], task_id=5)
    assert h.segmenter.segment_calls[-1][0].mask_logits is not None
    h.click([rectangle(12, 10, 30, 30), keypoint(20, 20)], task_id=6)
    h.click([rectangle(12, 10, 30, 30)], task_id=6)  # fewer prompts: not an extension
    assert h.segmenter.segment_calls[-1][0].mask_logits is None


def _polygons(h: Harness, items: list[dict], task_id: int) -> list[np.ndarray]:
    config = CONFIG.replace("BrushLabels", "PolygonLabels")
    body = {"tasks": [{"id": task_id, "data": {"image": h.image}}], "project": "1.1", "label_config": config,
            "params": {"context": {"result": items}}}
    response = h.client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    return [decode_region_mask(r) for r in response.json["results"][0]["result"]]


def test_a_polygon_answer_is_one_region_the_part_holding_the_clicks(make_client) -> None:
    h = Harness(make_client)  # the fake fills the box and an 11x11 square at each positive point
    box = rectangle(10, 10, 30, 30)  # pixels x 64..256, y 48..192
    (part,) = _polygons(h, [box, keypoint(80, 80)], task_id=1)  # the click lies outside the box
    assert part[384, 512] and not part[100, 100]
    (part,) = _polygons(h, [box, keypoint(20, 20), keypoint(80, 80)], task_id=2)  # both parts clicked
    assert part[100, 100] and not part[384, 512]  # the larger one
    (part,) = _polygons(h, [box, keypoint(80, 80, positive=False)], task_id=3)  # no positive click
    assert part[100, 100]


def test_points_with_different_labels_are_refused_by_name(make_client) -> None:
    h = Harness(make_client)
    response = h.click([keypoint(10, 10, label="cat"), keypoint(20, 20, label="dog")])
    assert response.status_code == 400
    assert "'cat'" in response.json["detail"] and "'dog'" in response.json["detail"]
    assert h.segmenter.segment_calls == []


def test_unlabeled_click_takes_the_only_label_of_a_rectangle_only_project(make_client) -> None:
    h = Harness(make_client)
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
              '<Label value="cat"/></RectangleLabels><KeyPoint name="kp" toName="image" smart="true"/></View>')
    body = {"tasks": [{"id": 1, "data": {"image": h.image}}], "project": "1.1", "label_config": config,
            "params": {"context": {"result": [keypoint(50, 50, label=None)]}}}
    response = h.client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    assert [r["value"]["rectanglelabels"] for r in response.json["results"][0]["result"]] == [["cat"]]


def test_a_click_on_another_image_is_refused_by_name() -> None:
    item = {**keypoint(50, 50), "to_name": "thumbnail"}
    with pytest.raises(InteractiveError, match="'thumbnail'.*'image'"):
        parse_context({"result": [item]}, PROJECT, 640, 480)
    labels_item = {"type": "labels", "to_name": "thumbnail", "value": {"labels": ["cat"]}}
    with pytest.raises(InteractiveError, match="'thumbnail'"):
        parse_context({"result": [keypoint(50, 50), labels_item]}, PROJECT, 640, 480)


@pytest.mark.parametrize(
    "context",
    [{"result": []}, {}, {"foo": 1}, {"result": None},
     {"result": [{"type": "choices", "value": {"choices": ["x"]}}]}],
)
def test_a_context_without_any_prompt_gets_the_clear_error(context: dict) -> None:
    with pytest.raises(InteractiveError, match="no result items|no keypoint, rectangle or text"):
        parse_context(context, PROJECT, 640, 480)


def test_two_annotators_of_one_task_keep_their_own_memory(make_client) -> None:
    h = Harness(make_client)
    first, second = keypoint(50.0, 25.0), keypoint(60.0, 25.0, positive=False)
    alice = {"project": 1, "drafts": [{"user": "alice@example.com", "result": []}]}
    bob = {"project": 1, "drafts": [{"user": "bob@example.com", "result": []}]}
    h.click([first], extra_task=alice)
    h.click([first, second], extra_task=bob)
    assert h.segmenter.segment_calls[-1][0].mask_logits is None, "Bob must not refine Alice's mask"
    h.click([first, second], extra_task=alice)
    assert h.segmenter.segment_calls[-1][0].mask_logits is not None
    h.click([first], extra_task={"project": 2})  # same task id in another project
    h.click([first, second], extra_task={"project": 3})
    assert h.segmenter.segment_calls[-1][0].mask_logits is None


def test_a_draft_saved_mid_sequence_keeps_the_memory_of_its_first_clicks(make_client) -> None:
    h = Harness(make_client)
    first, second = keypoint(50.0, 25.0), keypoint(60.0, 25.0, positive=False)
    h.click([first], extra_task={"project": 1})  # no draft yet: Label Studio names no annotator
    carol = {"project": 1, "drafts": [{"user": "carol@example.com", "result": []}]}
    h.click([first, second], extra_task=carol)  # the autosaved draft now names her
    assert h.segmenter.segment_calls[-1][0].mask_logits is not None
