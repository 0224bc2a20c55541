"""Interactive calls exactly as Label Studio sends them (ls-protocol.md), on the fake models."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend.config import Settings
from backend.labeling import parse_label_config
from backend.pipelines import interactive
from backend.regions import Instance, decode_region_mask, encode_instance
from tests.conftest import data_uri, keypoint, wait_for_models
from tests.fakes import BoxDetector, BoxFillSegmenter

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="cat" smart="true"/><Label value="dog" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="cat"/></RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" smart="true"/>
</View>
"""


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 80, 120)).save(buffer, "PNG")
    return buffer.getvalue()


def rectangle(x: float, y: float, width: float, height: float, label: str = "cat", rotation: float = 0) -> dict:
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": 640,
            "original_height": 480, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation,
                      "rectanglelabels": [label]}}


class Harness:
    def __init__(self, make_client, width: int = 640, height: int = 480, settings: Settings | None = None):
        self.segmenter = BoxFillSegmenter()
        self.detector = BoxDetector({"dog on the left": [((0.0, 0.0, 100.0, 100.0), 0.9)]})
        self.client, self.app = make_client(settings or Settings(), self.detector, self.segmenter)
        self.image = data_uri(_png(width, height))
        self.width, self.height = width, height
        wait_for_models(self.client, 10)

    def click(self, items: list[dict], task_id: int = 1, extra_task: dict | None = None):
        task = {"id": task_id, "data": {"image": self.image}, "annotations": [], "drafts": [], "predictions": []}
        task.update(extra_task or {})
        body = {"tasks": [task], "project": "1.1", "label_config": CONFIG,
                "params": {"login": None, "password": None, "context": {"result": items}}}
        return self.client.post("/predict", json=body)

    def only_mask(self, response) -> np.ndarray:
        assert response.status_code == 200, response.json
        regions = response.json["results"][0]["result"]
        assert len(regions) == 1 and regions[0]["from_name"] == "tag"
        return decode_region_mask(regions[0])


def test_one_positive_point_uses_multimask_and_lands_where_clicked(make_client) -> None:
    h = Harness(make_client)
    response = h.click([keypoint(50.0, 25.0)])
    mask = h.only_mask(response)
    region = response.json["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["cat"] and 0 < region["score"] <= 1
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (315, 325, 115, 125)
    assert h.segmenter.segment_calls[-1][0].points == ((320.0, 120.0),)


def test_multimask_only_for_a_single_ambiguous_point(make_client) -> None:
    h = Harness(make_client)
    calls: list[bool] = []
    original = h.segmenter.segment

    def spy(embedding, prompts, multimask=False):
        calls.append(multimask)
        return original(embedding, prompts, multimask)

    h.segmenter.segment = spy
    h.click([keypoint(50.0, 25.0)])
    h.click([keypoint(10.0, 10.0), keypoint(50.0, 25.0, positive=False)], task_id=2)
    h.click([rectangle(10, 10, 20, 20)], task_id=3)
    assert calls == [True, False, False]


def test_negative_point_by_either_flag_with_documented_precedence(make_client) -> None:
    h = Harness(make_client)
    legacy = keypoint(52.0, 25.0, positive=False)
    newest = keypoint(52.0, 25.0, positive=None)
    newest["value"]["positive"] = False
    both = keypoint(52.0, 25.0, positive=True)
    both["value"]["positive"] = False  # is_positive wins
    for task_id, second in enumerate((legacy, newest, both), start=1):
        h.click([keypoint(50.0, 25.0), second], task_id=task_id)
    labels = [calls[0].point_labels for calls in h.segmenter.segment_calls]
    assert labels == [(1, 0), (1, 0), (1, 1)]


def test_box_and_box_plus_points(make_client) -> None:
    h = Harness(make_client)
    mask = h.only_mask(h.click([rectangle(10, 20, 25, 50)]))
    expected = np.zeros((480, 640), bool)
    expected[96:336, 64:224] = True
    assert np.array_equal(mask, expected)
    combined = h.only_mask(h.click([rectangle(10, 20, 25, 50), keypoint(50.0, 50.0)], task_id=2))
    assert combined[96:336, 64:224].all() and combined[240, 320]


def test_rotated_box_uses_its_axis_aligned_bounds(make_client) -> None:
    h = Harness(make_client, width=400, height=400)
    h.click([rectangle(50, 10, 10, 20, rotation=90)])
    x0, y0, x1, y1 = h.segmenter.segment_calls[-1][0].box
    assert (x0, y0, x1, y1) == pytest.approx((120.0, 40.0, 200.0, 80.0))


def test_non_square_portrait_image_coordinates(make_client) -> None:
    h = Harness(make_client, width=480, height=640)
    response = h.click([keypoint(25.0, 75.0, w=480, h=640)])
    region = response.json["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (480, 640)
    assert h.segmenter.segment_calls[-1][0].points == ((120.0, 480.0),)


@pytest.mark.parametrize(
    ("items", "phrase"),
    [
        ([keypoint(50, 50, positive=False)], "only negative points"),
        ([keypoint(150, 50)], "outside the image"),
        ([keypoint(50, 50, label="horse")], "'horse' is not offered"),
        ([keypoint(50, 50, label=None)], "select a label"),
        ([{"type": "keypointlabels", "value": {"x": "a", "y": 1}}], "must be a number"),
        ([{"type": "choices", "value": {"choices": ["x"]}}], "no keypoint, rectangle or text"),
        (["junk"], "must be an object"),
    ],
)
def test_bad_contexts_get_a_clear_4xx(make_client, items: list, phrase: str) -> None:
    h = Harness(make_client)
    response = h.click(items)
    assert response.status_code == 400
    assert phrase in response.json["detail"]


def test_refinement_memory_feeds_previous_logits_only_when_extending(make_client) -> None:
    h = Harness(make_client)
    first = [keypoint(50.0, 25.0)]
    h.click(first)
    assert h.segmenter.segment_calls[-1][0].mask_logits is None
    h.click([*first, keypoint(60.0, 25.0, positive=False)])
    assert h.segmenter.segment_calls[-1][0].mask_logits is not None
    h.click([*first, keypoint(60.0, 25.0, positive=False)], task_id=2)  # another task: never mixed
    assert h.segmenter.segment_calls[-1][0].mask_logits is None
    h.click([keypoint(10.0, 10.0), keypoint(12.0, 12.0)])  # a new click sequence on task 1
    assert h.segmenter.segment_calls[-1][0].mask_logits is None


def test_click_inside_a_predicted_region_refines_it(make_client) -> None:
    h = Harness(make_client)
    control = parse_label_config(CONFIG).outputs[0]
    region_mask = np.zeros((480, 640), bool)
    region_mask[100:200, 300:400] = True
    stored = encode_instance(Instance("cat", 0.9, (300, 100, 400, 200), region_mask), control, 640, 480)
    task_extra = {"predictions": [{"result": stored, "model_version": "x"}]}
    h.click([keypoint(55.0, 30.0)], extra_task=task_extra)  # (352, 144): inside
    prompt = h.segmenter.segment_calls[-1][0]
    assert prompt.prior_mask is not None and np.array_equal(prompt.prior_mask, region_mask)
    assert prompt.box == (300.0, 100.0, 400.0, 200.0)
    h.click([keypoint(5.0, 5.0)], task_id=2, extra_task=task_extra)  # outside: starts over
    assert h.segmenter.segment_calls[-1][0].prior_mask is None
    off, _ = make_client(Settings(refine_existing=False), h.detector, h.segmenter)
    h.client = off
    h.click([keypoint(55.0, 30.0)], task_id=3, extra_task=task_extra)
    assert h.segmenter.segment_calls[-1][0].prior_mask is None


def test_text_prompt_runs_the_detector_on_the_phrase(make_client) -> None:
    h = Harness(make_client)
    text = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["dog on the left"]}}
    response = h.click([text, keypoint(1, 1, label="dog")])
    assert h.detector.calls[-1] == ("dog on the left",)
    regions = response.json["results"][0]["result"]
    assert [r["value"]["brushlabels"] for r in regions] == [["dog"]]


def _fastest_click(h: Harness, items: list[dict], extra: dict, first_task_id: int, tries: int = 3) -> float:
    """Best of ``tries`` clicks (each on a fresh task, so no refinement memory): the least
    disturbed by other work on a shared machine."""
    times = []
    for task_id in range(first_task_id, first_task_id + tries):
        started = time.perf_counter()
        response = h.click(items, task_id=task_id, extra_task=extra)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.json
    return min(times)


def test_megabytes_of_same_label_regions_decode_only_the_clicked_one(make_client, monkeypatch) -> None:
    """A long-edited task: ~5 MB of same-label brush masks and polygons, none under the click,
    then the region that is. Only that region is decoded, and the click costs about parsing
    its JSON, not a decode per region."""
    h = Harness(make_client)
    control = parse_label_config(CONFIG).outputs[0]
    polygons = parse_label_config(CONFIG.replace("BrushLabels", "PolygonLabels")).outputs[0]
    rng = np.random.default_rng(0)
    ragged = np.kron(rng.random((48, 64)) > 0.5, np.ones((10, 10), bool))  # ~40 KB of RLE
    ragged[100:141, 300:341] = False  # not under the click at (320, 120)
    brush = encode_instance(Instance("cat", 0.9, (0, 0, 640, 480), ragged), control, 640, 480)
    away = np.zeros((480, 640), bool)
    away[300:400, 20:200] = True
    polygon = encode_instance(Instance("cat", 0.9, (20, 300, 200, 400), away), polygons, 640, 480)
    hit = np.zeros((480, 640), bool)
    hit[100:200, 300:400] = True
    target = encode_instance(Instance("cat", 0.9, (300, 100, 400, 200), hit), control, 640, 480)
    extra = {"annotations": [{"result": brush * 30 + polygon * 30}], "predictions": [{"result": target}]}
    body_json = json.dumps(extra)
    assert len(body_json) > 5_000_000

    decoded: list[str] = []
    original = interactive.decode_region_mask

    def counting(region: dict) -> np.ndarray:
        decoded.append(region["type"])
        return original(region)

    monkeypatch.setattr(interactive, "decode_region_mask", counting)
    h.click([keypoint(50.0, 25.0)], extra_task=extra)
    assert decoded == ["brushlabels"], "only the region under the click may be decoded"
    prompt = h.segmenter.segment_calls[-1][0]
    assert prompt.prior_mask is not None and np.array_equal(prompt.prior_mask, hit)

    parse_times = []
    for _ in range(3):
        started = time.perf_counter()
        json.loads(json.dumps(extra))  # the test client encodes the body, the app decodes it
        parse_times.append(time.perf_counter() - started)
    empty = _fastest_click(h, [keypoint(50.0, 25.0)], {}, first_task_id=10)
    loaded = _fastest_click(h, [keypoint(50.0, 25.0)], extra, first_task_id=20)
    assert loaded <= 3 * empty + 3 * min(parse_times), (loaded, empty, min(parse_times))


def test_concurrent_clicks_on_one_image_compute_the_embedding_once(make_client) -> None:
    h = Harness(make_client)
    h.segmenter.embed_delay_s = 0.3
    statuses: list[int] = []

    def one(i: int) -> None:
        statuses.append(h.click([keypoint(10.0 + i, 20.0)], task_id=i).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 8
    assert h.segmenter.embed_calls == 1


def test_unlabeled_keypoint_takes_the_only_mask_label(make_client) -> None:
    h = Harness(make_client)
    single = CONFIG.replace('<Label value="dog"/>', "", 1)
    task = {"id": 1, "data": {"image": h.image}}
    body = {"tasks": [task], "project": "1.1", "label_config": single,
            "params": {"context": {"result": [keypoint(50.0, 25.0, label=None, positive=None)]}}}
    regions = h.client.post("/predict", json=body).json["results"][0]["result"]
    assert [r["value"]["brushlabels"] for r in regions] == [["cat"]]


def test_prewarm_caches_the_embedding_and_answers_no_regions(make_client) -> None:
    h = Harness(make_client)
    task = {"id": 7, "data": {"image": h.image}}
    body = {"tasks": [task], "project": "1.1", "label_config": CONFIG, "params": {"context": {"event": "prewarm"}}}
    response = h.client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    item = response.json["results"][0]
    assert item["result"] == [] and item["model_version"]
    assert h.segmenter.embed_calls == 1 and h.segmenter.segment_calls == []
    h.click([keypoint(50.0, 25.0)], task_id=7)
    assert h.segmenter.embed_calls == 1, "the first real click after prewarm must reuse the embedding"


def _preannotate(h: Harness, task_id: int, project: str = "1.1"):
    body = {"tasks": [{"id": task_id, "data": {"image": h.image}}], "project": project, "label_config": CONFIG}
    response = h.client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    return response.json["results"][0]


@pytest.mark.parametrize("remember", [True, False])
def test_typed_phrase_is_remembered_for_the_projects_next_tasks_only_when_enabled(make_client, remember) -> None:
    h = Harness(make_client, settings=Settings(remember_text_prompt=remember))
    text = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["dog on the left"]}}
    version_before = _preannotate(h, 1)["model_version"]
    h.click([text, keypoint(1, 1, label="dog")], task_id=1)

    item = _preannotate(h, 2)
    prompts = h.detector.calls[-1]
    labels = [r["value"].get("brushlabels") for r in item["result"] if r["type"] == "brushlabels"]
    if remember:
        assert "dog on the left" in prompts and "dog" not in prompts and "cat" in prompts
        assert labels == [["dog"]]
    else:
        assert "dog on the left" not in prompts and "dog" in prompts
        assert labels == []
    assert item["model_version"] == version_before

    _preannotate(h, 3, project="2.1")  # another project keeps its config's prompts
    assert "dog" in h.detector.calls[-1] and "dog on the left" not in h.detector.calls[-1]


def test_preannotation_leaves_the_first_click_warm(make_client) -> None:
    h = Harness(make_client)
    h.detector.boxes["cat"] = [((10.0, 10.0, 60.0, 60.0), 0.9)]
    assert _preannotate(h, 5)["result"]
    assert h.segmenter.embed_calls == 1
    h.click([keypoint(20.0, 20.0)], task_id=5)
    assert h.segmenter.embed_calls == 1


def test_clicks_answer_a_bitmask_control_with_a_png_mask(make_client) -> None:
    h = Harness(make_client)
    bitmask = CONFIG.replace("BrushLabels", "BitmaskLabels")
    task = {"id": 1, "data": {"image": h.image}}
    body = {"tasks": [task], "project": "1.1", "label_config": bitmask,
            "params": {"context": {"result": [keypoint(50.0, 25.0)]}}}
    regions = h.client.post("/predict", json=body).json["results"][0]["result"]
    assert [(r["type"], r["value"]["bitmasklabels"]) for r in regions] == [("bitmasklabels", ["cat"])]
    assert regions[0]["value"]["imageDataURL"].startswith("data:image/png;base64,")
    mask = decode_region_mask(regions[0])
    expected = np.zeros((480, 640), bool)
    expected[120 - 5:120 + 6, 320 - 5:320 + 6] = True
    assert np.array_equal(mask, expected)
