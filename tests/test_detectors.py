"""Detector adapters: tiny random GroundingDINO / MM-GroundingDINO / OWLv2 saved to a temp dir
and loaded through the same from_pretrained path as a hub id, plus label mapping checked
exactly with a scripted model output."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from backend.config import Settings
from backend.labeling import parse_label_config
from backend.metrics import Metrics
from backend.models.base import Detection, Detector
from backend.models.captions import normalize_phrase
from backend.models.grounding_dino import GroundingDinoDetector
from backend.models.loading import ModelLoadError
from backend.models.owlv2 import Owlv2Detector
from backend.predictor import Credentials
from tests.conftest import build_predictor, data_uri, png_bytes
from tests.fakes import BoxFillSegmenter
from tests.tiny_models import (
    DEFAULT_WORDS,
    build_tiny_grounding_dino,
    build_tiny_mm_grounding_dino,
    build_tiny_owlv2,
)

PROMPTS = ["cat", "red car", "zebra", "traffic light"]
DOT = 1012


@pytest.fixture(scope="module")
def grounding_dino_dir(tmp_path_factory):
    return str(build_tiny_grounding_dino(tmp_path_factory.mktemp("gdino")))


@pytest.fixture(scope="module")
def mm_grounding_dino_dir(tmp_path_factory):
    return str(build_tiny_mm_grounding_dino(tmp_path_factory.mktemp("mmgdino")))


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    return str(build_tiny_owlv2(tmp_path_factory.mktemp("owlv2")))


@pytest.fixture(scope="module")
def grounding_dino(grounding_dino_dir):
    return GroundingDinoDetector(grounding_dino_dir, device="cpu")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """Non-square, so swapped width/height in box scaling would show."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(91, 173, 3), dtype=np.uint8))


def assert_valid(detections: list[Detection], image: Image.Image, prompt_count: int) -> None:
    width, height = image.size
    for detection in detections:
        assert 0 <= detection.prompt_index < prompt_count
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, detection.box


@pytest.mark.parametrize("family", ["grounding_dino_dir", "mm_grounding_dino_dir"])
def test_grounding_dino_family_loads_and_detects(family, request, image):
    detector = GroundingDinoDetector(request.getfixturevalue(family), device="auto")
    assert isinstance(detector, Detector)
    detections, stats = detector.detect_with_stats(image, PROMPTS, box_threshold=0.0, text_threshold=0.0)
    assert detections, "thresholds of 0 keep every query inside the image"
    assert_valid(detections, image, len(PROMPTS))
    assert stats.forwards == 1 and stats.unmatched == 0
    assert stats.above_box_threshold == detector.model.config.num_queries
    assert {d.prompt_index for d in detections} <= set(range(len(PROMPTS)))


def test_thresholds(grounding_dino, image):
    everything, _ = grounding_dino.detect_with_stats(image, PROMPTS, 0.0, 0.0)
    scores = sorted(d.score for d in everything)
    middle = scores[len(scores) // 2]
    kept = grounding_dino.detect(image, PROMPTS, box_threshold=middle, text_threshold=0.0)
    assert kept and all(d.score >= middle for d in kept)
    assert len(kept) < len(everything)

    none, stats = grounding_dino.detect_with_stats(image, PROMPTS, box_threshold=0.0, text_threshold=1.01)
    assert none == []
    assert stats.unmatched == stats.above_box_threshold > 0, "sure boxes that no phrase names are counted"

    assert grounding_dino.detect(image, PROMPTS, box_threshold=1.01, text_threshold=0.0) == []
    assert grounding_dino.detect(image, [], 0.0, 0.0) == []


class ScriptedModel:
    """Stands in for the GroundingDINO forward: query q lights up the *last* token of the
    q-th phrase of whatever caption it is given (phrases found from the "." ids, not from
    captions.py), a few extra queries light up only separators, and each box encodes
    (call, query) in its centre so the test can trace a detection back to its phrase."""

    queries = 80

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.phrase_text: dict[tuple[int, int], str] = {}
        self.lengths: list[int] = []

    def __call__(self, *, input_ids, pixel_values, **_):
        call = len(self.lengths)
        ids = input_ids[0].tolist()
        self.lengths.append(len(ids))
        logits = torch.full((1, self.queries, 256), float("-inf"))
        logits[0, :, : len(ids)] = -8.0
        boxes = torch.zeros(1, self.queries, 4)
        dots = [i for i, token in enumerate(ids) if token == DOT]
        starts = [1] + [d + 1 for d in dots[:-1]]
        for q, (start, end) in enumerate(zip(starts, dots, strict=True)):
            logits[0, q, end - 1] = 4.0
            self.phrase_text[(call, q)] = self.tokenizer.decode(ids[start:end])
        for q in range(len(dots), len(dots) + 3):
            logits[0, q, dots[0]] = 4.0  # a confident box named only by a "."
        boxes[0, :, 0] = (torch.arange(self.queries) + 0.5) / self.queries
        boxes[0, :, 1] = (call + 0.5) / 10
        boxes[0, :, 2:] = 0.002
        return SimpleNamespace(logits=logits, pred_boxes=boxes)


def sixty_labels() -> list[str]:
    """60 labels of 4 to 10 tokens (words spelled out in characters): several captions' worth."""
    extra = ["zebra", "number", "quartz", "wagon"]
    return [f"{DEFAULT_WORDS[i % 8]} {extra[i % 4]} {i}" for i in range(60)]


def traced_phrase(scripted: ScriptedModel, centre: tuple[float, float]) -> str:
    """The caption phrase whose query produced a box, from the box centre as a fraction of the
    image (``ScriptedModel`` encodes the call in y and the query in x)."""
    cx, cy = centre
    return scripted.phrase_text[(round(cy * 10 - 0.5), round(cx * ScriptedModel.queries - 0.5))]


def test_sixty_labels_mapped_to_their_own_boxes(grounding_dino, monkeypatch):
    prompts = sixty_labels()
    scripted = ScriptedModel(grounding_dino.processor.tokenizer)
    monkeypatch.setattr(grounding_dino, "model", scripted)
    image = Image.new("RGB", (1000, 500))

    detections, stats = grounding_dino.detect_with_stats(
        image, prompts, box_threshold=0.3, text_threshold=0.25
    )

    assert stats.forwards == len(scripted.lengths) > 1, "60 long labels need several captions"
    assert max(scripted.lengths) <= 256
    assert stats.unmatched == 3 * stats.forwards, "separator-only queries are dropped and counted"
    assert sorted(d.prompt_index for d in detections) == list(range(60)), "each label once"
    for detection in detections:
        centre = ((detection.box[0] + detection.box[2]) / 2 / 1000, (detection.box[1] + detection.box[3]) / 2 / 500)
        assert traced_phrase(scripted, centre) == normalize_phrase(prompts[detection.prompt_index])
        assert detection.score == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())


def test_sixty_label_config_gets_every_label_its_own_regions(grounding_dino, monkeypatch):
    """Issue 2's mapping check from end to end: label config -> prompts -> captions and token
    spans -> boxes -> regions, with a model output that reports token positions only. A
    region's label must be the label whose phrase its query lit up, in every caption; boxes
    lighting up only a "." (a phrase covering no label) are dropped and counted."""
    labels = sixty_labels()
    tags = "".join(f'<Label value="{label}"/>' for label in labels)
    config = (
        f'<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">{tags}'
        f'</RectangleLabels><BrushLabels name="brush" toName="image">{tags}</BrushLabels></View>'
    )
    project = parse_label_config(config)
    assert list(project.prompts_by_label()) == labels
    scripted = ScriptedModel(grounding_dino.processor.tokenizer)
    monkeypatch.setattr(grounding_dino, "model", scripted)
    metrics = Metrics()
    predictor = build_predictor(Settings(), grounding_dino, BoxFillSegmenter(), metrics)
    task = {"id": 1, "data": {"image": data_uri(png_bytes(1000, 500))}}

    (item,) = predictor.predict_tasks([task], config, Credentials())

    assert "result" in item, item
    forwards = len(scripted.lengths)
    assert forwards > 1, "60 labels need several captions"
    assert metrics.registry.get_sample_value("gsb_unmatched_phrases_total") == 3 * forwards
    for control, kind in (("box", "rectanglelabels"), ("brush", "brushlabels")):
        regions = [region for region in item["result"] if region["from_name"] == control]
        assert sorted(region["value"][kind][0] for region in regions) == sorted(labels), f"{control}: each label once"
    for region in item["result"]:
        if region["type"] != "rectanglelabels":
            continue
        value = region["value"]
        centre = ((value["x"] + value["width"] / 2) / 100, (value["y"] + value["height"] / 2) / 100)
        assert traced_phrase(scripted, centre) == normalize_phrase(value["rectanglelabels"][0])


def test_max_image_size_is_applied(grounding_dino_dir, image, monkeypatch):
    detector = GroundingDinoDetector(grounding_dino_dir, shortest_edge=80, longest_edge=128)
    seen = []
    forward = detector.model.forward

    def record(**kwargs):
        seen.append(tuple(kwargs["pixel_values"].shape[-2:]))
        return forward(**kwargs)

    monkeypatch.setattr(detector.model, "forward", record)
    assert_valid(detector.detect(image, PROMPTS, 0.0, 0.0), image, len(PROMPTS))
    assert seen and max(seen[0]) <= 128 and min(seen[0]) <= 80


def test_concurrent_calls_match_sequential(grounding_dino, image):
    expected = grounding_dino.detect(image, PROMPTS, 0.2, 0.2)
    results: list[list[Detection]] = []

    def run():
        results.append(grounding_dino.detect(image, PROMPTS, 0.2, 0.2))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for result in results:
        assert [d.prompt_index for d in result] == [d.prompt_index for d in expected]
        np.testing.assert_allclose([d.box for d in result], [d.box for d in expected], atol=1e-4)


def test_bfloat16_compute_runs(grounding_dino_dir, image):
    detector = GroundingDinoDetector(grounding_dino_dir, dtype=torch.bfloat16)
    assert_valid(detector.detect(image, PROMPTS, 0.0, 0.0), image, len(PROMPTS))


def test_owlv2_loads_and_detects(owlv2_dir, image):
    detector = Owlv2Detector(owlv2_dir)
    assert isinstance(detector, Detector)
    detections, stats = detector.detect_with_stats(image, PROMPTS, box_threshold=0.0, text_threshold=0.9)
    assert detections
    assert_valid(detections, image, len(PROMPTS))
    assert stats.forwards == 1 and stats.unmatched == 0
    assert detector.detect(image, PROMPTS, 0.0, 0.0) == detections, "text_threshold is ignored"
    assert detector.detect(image, PROMPTS, 1.01, 0.0) == []
    long_prompt = "red car " * 20  # 40 tokens: cut to the text tower's 16
    assert_valid(detector.detect(image, [long_prompt, "cat"], 0.0, 0.0), image, 2)


def test_owlv2_label_is_prompt_index(owlv2_dir, monkeypatch):
    detector = Owlv2Detector(owlv2_dir)
    forward = detector.model.forward

    def scripted(**kwargs):
        outputs = forward(**kwargs)
        prompts = outputs.logits.shape[-1]
        logits = torch.full_like(outputs.logits, -9.0)
        for q in range(logits.shape[1]):
            logits[0, q, q % prompts] = 3.0
        outputs.logits = logits
        # the left half of the padded square is image: place every box there
        outputs.pred_boxes = torch.tensor([[0.25, 0.25, 0.1, 0.1]]).expand_as(outputs.pred_boxes)
        return outputs

    monkeypatch.setattr(detector.model, "forward", scripted)
    image = Image.new("RGB", (200, 100))
    detections = detector.detect(image, PROMPTS, 0.5, 0.0)
    assert [d.prompt_index for d in detections] == [q % len(PROMPTS) for q in range(36)]
    # padded to 200x200: centre (50, 50), size 20 in original pixels
    assert detections[0].box == pytest.approx((40.0, 40.0, 60.0, 60.0))


def test_missing_local_dir_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model") as info:
        GroundingDinoDetector(missing)
    assert "does not exist" in str(info.value)
    with pytest.raises(ModelLoadError, match="no-such-model"):
        Owlv2Detector(missing)


def test_missing_hub_id_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        GroundingDinoDetector("IDEA-Research/no-such-grounding-dino")
    message = str(info.value)
    assert "IDEA-Research/no-such-grounding-dino" in message
    assert "HF_HOME" in message and "HF_HUB_OFFLINE" in message


def test_wrong_model_family_is_a_clear_error(grounding_dino_dir, owlv2_dir):
    with pytest.raises(ModelLoadError, match="owlv2"):
        GroundingDinoDetector(owlv2_dir)
    with pytest.raises(ModelLoadError, match="grounding-dino"):
        Owlv2Detector(grounding_dino_dir)
