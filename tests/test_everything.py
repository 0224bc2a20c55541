"""The everything mode: point grid, filtering, NMS, crops, labelling, complement, coverage and
mode selection, exactly on synthetic shapes with fake models, and end to end on a tiny SAM."""

from __future__ import annotations

import inspect
import io
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import build_point_grid, calculate_stability_score, generate_crop_boxes
from torchvision.ops import box_iou

from backend.config import ConfigError, Settings
from backend.embedding_cache import EmbeddingCache
from backend.labeling import parse_label_config
from backend.models.base import CandidateSegmenter, PromptSet
from backend.models.sam import SamSegmenter
from backend.pipelines.everything import (
    AutoModels,
    AutoParams,
    EverythingParams,
    drop_covered,
    existing_masks,
    generate_masks,
    heatmap_points,
    label_by_boxes,
    load_auto_models,
    make_non_overlapping,
    point_grid,
    predict_instances,
    segment_stuff,
    stability_scores,
    upsample_logits,
)
from backend.pipelines.preannotate import PreannotateParams
from backend.predictor import Credentials, model_version_for
from backend.regions import Instance, decode_region_mask, encode_brush_rle
from tests.conftest import build_predictor, data_uri
from tests.fakes import BoxDetector, BoxFillSegmenter, ShapeSegmenter
from tests.tiny_sam_models import build_tiny_sam

WIDTH, HEIGHT = 128, 96
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="cat"/><Label value="dog"/><Label value="object"/><Label value="sky"/>
  </BrushLabels>
</View>
"""


def shapes(blob: bool = False) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """Three rectangles and a disk on black (plus a magenta blob), with their exact masks."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    masks = {name: np.zeros((HEIGHT, WIDTH), bool) for name in ("red", "green", "blue", "disk")}
    masks["red"][8:30, 10:40] = True
    masks["green"][40:70, 8:30] = True
    masks["blue"][60:90, 50:80] = True
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    masks["disk"][(yy - 30) ** 2 + (xx - 100) ** 2 <= 15**2] = True
    if blob:
        masks["blob"] = ((yy - 80) / 10) ** 2 + ((xx - 105) / 16) ** 2 <= 1
    colours = {
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "disk": (255, 255, 0),
        "blob": (255, 0, 255),
    }
    for name, mask in masks.items():
        pixels[mask] = colours[name]
    return Image.fromarray(pixels), masks


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def cache() -> EmbeddingCache:
    return EmbeddingCache(max_bytes=10**9)


def same_masks(found: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> bool:
    """Each expected mask found exactly once, nothing else."""
    remaining = list(found)
    for mask in expected:
        matches = [i for i, other in enumerate(remaining) if np.array_equal(other, mask)]
        if len(matches) != 1:
            return False
        remaining.pop(matches[0])
    return not remaining


# ----------------------------------------------------------------------------- geometry


def test_defaults_are_segment_anythings_automatic_mask_generator_defaults() -> None:
    """``EverythingParams()`` (an unconfigured server) means what ``SamAutomaticMaskGenerator(sam)``
    means, read from its signature so an upstream change shows here. Not mirrored: the model,
    explicit point grids and the output format, which the backend decides itself."""
    reference = inspect.signature(SamAutomaticMaskGenerator).parameters
    ours = {spec.name: getattr(EverythingParams(), spec.name) for spec in fields(EverythingParams)}
    assert set(reference) - set(ours) == {"model", "point_grids", "output_mode"}
    for name, value in ours.items():
        assert value == pytest.approx(reference[name].default), name


@pytest.mark.parametrize("per_side", [1, 4, 32])
def test_point_grid_is_segment_anythings_grid(per_side: int) -> None:
    np.testing.assert_allclose(point_grid(per_side), build_point_grid(per_side))


@pytest.mark.parametrize("size", [(96, 128), (1500, 2250), (37, 53)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes_are_segment_anythings_crops(size: tuple[int, int], layers: int) -> None:
    from backend.pipelines.everything import crop_boxes

    boxes, layer_ids = generate_crop_boxes(size, layers, 512 / 1500)
    assert crop_boxes(*size, layers, 512 / 1500) == [(tuple(b), i) for b, i in zip(boxes, layer_ids, strict=True)]


def test_stability_score_is_segment_anythings_and_penalises_soft_masks() -> None:
    logits = torch.randn(6, 40, 50) * 4
    reference = calculate_stability_score(logits, 0.0, 1.0).numpy()
    np.testing.assert_allclose(stability_scores(logits.numpy(), 1.0), reference, rtol=1e-6)
    ramp = np.tile(np.linspace(-4, 4, 9), (1, 3, 1))  # 9 columns: -4 .. 4
    # > 1: columns 2, 3, 4 (of -4..4: values 2, 3, 4); > -1: columns with 0..4 -> 5 columns
    assert stability_scores(ramp, 1.0).item() == pytest.approx(3 / 5)
    assert stability_scores(np.full((1, 4, 4), -5.0), 1.0).item() == 0.0


def test_upsampling_maps_the_image_part_of_a_padded_frame_to_the_image() -> None:
    # a 32x32 logit frame over a 128x128 padded input; the 80x128 image covers 20x32 cells
    frame = torch.full((32, 32), -10.0)
    frame[5:15, 8:16] = 10.0  # image rows 20..60, cols 32..64 (4 px per cell)
    frame[20:, :] = 10.0  # padding: must not leak into the image
    mask = upsample_logits(frame, (20.0, 32.0), (40, 64))  # original image: half the input size
    expected = np.zeros((40, 64), bool)
    expected[10:30, 16:32] = True
    assert np.array_equal(mask, expected)


# ----------------------------------------------------------------------------- generation


def test_three_rectangles_and_a_disk_give_four_exact_masks_in_bounded_batches() -> None:
    image, expected = shapes()
    segmenter = ShapeSegmenter()
    masks = generate_masks(image, "sha", segmenter, cache(), EverythingParams(points_per_side=16, points_per_batch=50))
    assert same_masks([m.mask for m in masks], list(expected.values()))
    assert all(m.predicted_iou == pytest.approx(0.95) and m.stability_score == 1.0 for m in masks)
    assert all(m.box == box_of(m.mask) for m in masks)
    assert segmenter.batch_sizes == [50, 50, 50, 50, 50, 6]  # 16 x 16 points


def test_iou_and_stability_filters_decide_which_candidates_survive() -> None:
    image, expected = shapes()
    # no IoU filter: the whole-image candidate (score 0.5) survives; background clicks (0.3)
    # give the black region, whose box is the whole image too: NMS keeps the better one
    loose = generate_masks(
        image, "sha", ShapeSegmenter(), cache(), EverythingParams(points_per_side=16, pred_iou_thresh=0.2)
    )
    assert same_masks([m.mask for m in loose], [*expected.values(), np.ones((HEIGHT, WIDTH), bool)])
    # no stability filter: the soft bounding-box candidates (scored higher) win NMS, so the disk
    # comes out as its box; the default stability threshold removes them
    unstable = generate_masks(
        image, "sha", ShapeSegmenter(), cache(), EverythingParams(points_per_side=16, stability_score_thresh=0.0)
    )
    disk_box = np.zeros_like(expected["disk"])
    x0, y0, x1, y1 = (int(v) for v in box_of(expected["disk"]))
    disk_box[y0:y1, x0:x1] = True
    assert any(np.array_equal(m.mask, disk_box) for m in unstable)
    assert not any(np.array_equal(m.mask, expected["disk"]) for m in unstable)


def test_crop_layers_embed_each_crop_and_still_give_each_shape_once() -> None:
    image, expected = shapes()
    segmenter = ShapeSegmenter()
    params = EverythingParams(points_per_side=16, crop_n_layers=1, crop_n_points_downscale_factor=2)
    masks = generate_masks(image, "sha", segmenter, cache(), params)
    assert same_masks([m.mask for m in masks], list(expected.values()))
    assert len(segmenter.embedded_sizes) == 5  # the image, then 2 x 2 crops
    assert segmenter.embedded_sizes[1] != (HEIGHT, WIDTH)
    assert sum(segmenter.batch_sizes) == 16 * 16 + 4 * 8 * 8


def test_min_mask_region_area_fills_holes_and_drops_specks() -> None:
    image, expected = shapes()
    pixels = np.array(image)
    pixels[18:22, 18:22] = (0, 255, 255)  # a 16-pixel speck inside the red rectangle, on a grid point
    speckled = Image.fromarray(pixels)
    speck = np.zeros((HEIGHT, WIDTH), bool)
    speck[18:22, 18:22] = True
    holed = expected["red"] & ~speck
    raw = generate_masks(speckled, "sha1", ShapeSegmenter(), cache(), EverythingParams(points_per_side=16))
    assert same_masks([m.mask for m in raw], [holed, speck, expected["green"], expected["blue"], expected["disk"]])
    cleaned = generate_masks(
        speckled, "sha2", ShapeSegmenter(), cache(), EverythingParams(points_per_side=16, min_mask_region_area=20)
    )
    assert same_masks([m.mask for m in cleaned], list(expected.values()))


def test_a_segmenter_without_candidates_is_refused_with_a_clear_error() -> None:
    class PlainSegmenter:
        model_id = "plain"

        def embed(self, image: Image.Image) -> None: ...

        def segment(self, embedding: object, prompts: object, multimask: bool = False) -> list: ...

    with pytest.raises(ConfigError, match="segment_candidates"):
        generate_masks(shapes()[0], "sha", PlainSegmenter(), cache(), EverythingParams())  # type: ignore[arg-type]
    assert isinstance(BoxFillSegmenter(), CandidateSegmenter)


def test_bad_parameters_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="POINTS_PER_SIDE"):
        EverythingParams(points_per_side=0)
    with pytest.raises(ConfigError, match="PRED_IOU_THRESH"):
        AutoParams.from_settings(Settings(pred_iou_thresh=1.5))
    with pytest.raises(ConfigError, match="CLIPSEG_MODEL"):
        load_auto_models(Settings(label_modes={"sky": "stuff"}))


# ----------------------------------------------------------------------------- labelling


def _run(
    mode: str,
    params: AutoParams,
    detector: BoxDetector,
    image: Image.Image,
    task: dict | None = None,
    models: AutoModels | None = None,
    config: str = CONFIG,
) -> list[Instance]:
    project = parse_label_config(config)
    return predict_instances(
        mode,
        image,
        "sha",
        task or {},
        project,
        detector,
        ShapeSegmenter(),
        cache(),
        models or AutoModels(),
        PreannotateParams(),
        params,
        "grounded-sam-v1",
    )


def _grid(**changes: object) -> AutoParams:
    return AutoParams(everything=EverythingParams(points_per_side=16), **changes)  # type: ignore[arg-type]


def test_masks_take_the_label_of_the_detector_box_they_match_and_the_rest_the_catch_all() -> None:
    image, expected = shapes(blob=True)
    detector = BoxDetector(
        {
            "cat": [((11, 9, 41, 31), 0.8)],  # the red rectangle's box, one pixel off
            "dog": [(box_of(expected["disk"]), 0.6)],
        }
    )
    labelled = _run("everything", _grid(unlabeled_label="object"), detector, image)
    by_label = {label: [i for i in labelled if i.label == label] for label in ("cat", "dog", "object")}
    assert len(by_label["cat"]) == 1 and np.array_equal(by_label["cat"][0].mask, expected["red"])
    assert by_label["cat"][0].score == pytest.approx(0.95 * 0.8)
    assert len(by_label["dog"]) == 1 and np.array_equal(by_label["dog"][0].mask, expected["disk"])
    assert same_masks([i.mask for i in by_label["object"]], [expected["green"], expected["blue"], expected["blob"]])
    assert all(i.score == pytest.approx(0.95) for i in by_label["object"])
    assert detector.calls == [("cat", "dog", "object", "sky")]

    dropped = _run("everything", _grid(), detector, image)
    assert sorted(i.label for i in dropped) == ["cat", "dog"]
    not_in_project = _run("everything", _grid(unlabeled_label="vehicle"), detector, image)
    assert sorted(i.label for i in not_in_project) == ["cat", "dog"]


def test_box_agreement_needs_the_iou_threshold() -> None:
    boxes = [(0.0, 0.0, 10.0, 10.0), (50.0, 50.0, 60.0, 60.0)]
    detections = [((0.0, 0.0, 10.0, 20.0), 0.7, "cat"), ((0.0, 0.0, 10.0, 11.0), 0.5, "dog")]
    # IoU with the dog box 100/110, with the cat box 0.5: the best overlap wins
    assert label_by_boxes(boxes, detections, 0.5) == [("dog", 0.5), None]
    assert label_by_boxes(boxes, detections[:1], 0.5) == [("cat", 0.7), None]
    assert label_by_boxes(boxes, detections[:1], 0.6) == [None, None]


class ColourClassifier:
    """CLIP stand-in: the crop's most common non-grey colour decides the phrase."""

    model_id = "test/colour-classifier"

    def __init__(self, phrase_by_colour: dict[tuple[int, int, int], str]) -> None:
        self.phrase_by_colour = phrase_by_colour
        self.crops: list[Image.Image] = []

    def classify(self, images: Sequence[Image.Image], phrases: Sequence[str]) -> np.ndarray:
        self.crops.extend(images)
        probs = np.full((len(images), len(phrases)), 0.1 / len(phrases), np.float32)
        for row, image in enumerate(images):
            pixels = np.asarray(image).reshape(-1, 3)
            pixels = pixels[~np.all(pixels == 128, axis=1)]
            colours, counts = np.unique(pixels, axis=0, return_counts=True)
            phrase = self.phrase_by_colour.get(tuple(int(c) for c in colours[counts.argmax()]), "background")
            probs[row, phrases.index(phrase)] += 0.9
        return probs


def test_clip_labels_what_the_detector_left_and_crops_grey_out_the_background() -> None:
    image, expected = shapes()
    detector = BoxDetector({"cat": [(box_of(expected["red"]), 0.8)]})
    classifier = ColourClassifier({(0, 255, 0): "dog", (255, 255, 0): "cat"})
    labelled = _run("everything", _grid(), detector, image, models=AutoModels(classifier=classifier))
    found = sorted((i.label, box_of(i.mask)) for i in labelled)
    assert found == sorted(
        [("cat", box_of(expected["red"])), ("dog", box_of(expected["green"])), ("cat", box_of(expected["disk"]))]
    )  # the blue rectangle reads as background: dropped
    assert len(classifier.crops) == 3  # the detector's mask is not sent to CLIP
    disk_crop = next(np.asarray(c) for c in classifier.crops if c.size == (31, 31))
    assert tuple(disk_crop[0, 0]) == (128, 128, 128) and tuple(disk_crop[15, 15]) == (255, 255, 0)
    strict = _run("everything", _grid(clip_threshold=0.95), detector, image, models=AutoModels(classifier=classifier))
    assert [i.label for i in strict] == ["cat"]


# ----------------------------------------------------------------------------- stuff, complement, coverage


class BandHeatmaps:
    """CLIPSeg stand-in: probability 0.9 in the top ``rows`` rows, 0.1 below, for every phrase."""

    model_id = "test/band-heatmaps"

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.phrases: list[tuple[str, ...]] = []

    def heatmaps(self, image: Image.Image, phrases: Sequence[str]) -> np.ndarray:
        self.phrases.append(tuple(phrases))
        heat = np.full((len(phrases), image.height, image.width), 0.1, np.float32)
        heat[:, : self.rows] = 0.9
        return heat


def test_stuff_labels_go_to_the_heatmap_model_and_not_to_the_detector() -> None:
    image, _ = shapes()
    config = CONFIG.replace('<Label value="sky"/>', '<Label value="sky" mode="stuff"/>')
    detector = BoxDetector({})
    heatmapper = BandHeatmaps(rows=6)
    found = _run("grounded", _grid(), detector, image, models=AutoModels(heatmapper=heatmapper), config=config)
    assert [i.label for i in found] == ["sky"]
    band = np.zeros((HEIGHT, WIDTH), bool)
    band[:6] = True
    assert np.array_equal(found[0].mask, band) and found[0].score == pytest.approx(0.9)
    assert heatmapper.phrases == [("sky",)] and detector.calls == [("cat", "dog", "object")]
    # without a heatmap model the stuff label is an ordinary detector label
    _run("grounded", _grid(), detector, image, config=config)
    assert detector.calls[-1] == ("cat", "dog", "object", "sky")


def test_stuff_refinement_clicks_the_heatmap_peaks() -> None:
    heat = np.zeros((40, 60), np.float32)
    heat[5:15, 5:55] = 0.8
    heat[10, 30] = 0.95
    mask = heat > 0.5
    points = heatmap_points(heat, mask, 4)
    assert points[0] == (30.5, 10.5)  # the hottest pixel first
    assert len(points) == 4 and all(mask[int(y), int(x)] for x, y in points)
    radius = np.sqrt(mask.sum() / 4) / 2
    assert min(np.hypot(a[0] - b[0], a[1] - b[1]) for a in points for b in points if a != b) > radius

    image, expected = shapes()
    heatmapper = BandHeatmaps(rows=0)
    heatmapper.heatmaps = lambda img, phrases: np.where(expected["green"], 0.9, 0.1)[None].astype(np.float32)  # type: ignore[method-assign]
    refined = segment_stuff(
        image,
        "sha",
        {"grass": ("grass",)},
        heatmapper,
        AutoParams(clipseg_refine_points=3),
        0,
        ShapeSegmenter(),
        cache(),
    )
    assert len(refined) == 1 and np.array_equal(refined[0].mask, expected["green"])
    assert refined[0].score == pytest.approx(0.9 * 0.95)


def _brush_region(mask: np.ndarray, label: str) -> dict:
    return {
        "type": "brushlabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [label]},
    }


def test_masks_already_in_the_task_are_not_proposed_again() -> None:
    image, expected = shapes()
    task = {
        "annotations": [{"result": [_brush_region(expected["red"], "cat")]}],
        # this backend's own earlier answer does not count, another model's does
        "predictions": [
            {"model_version": "grounded-sam-v1", "result": [_brush_region(expected["green"], "object")]},
            {"model_version": "other-model", "result": [_brush_region(expected["disk"], "dog")]},
        ],
    }
    assert len(existing_masks(task, WIDTH, HEIGHT, "grounded-sam-v1")) == 2
    keep_all = _run("everything", _grid(unlabeled_label="object"), BoxDetector({}), image, task)
    assert len(keep_all) == 4
    complement = _run(
        "everything", _grid(unlabeled_label="object", skip_existing_masks=True), BoxDetector({}), image, task
    )
    assert same_masks([i.mask for i in complement], [expected["green"], expected["blue"]])


def test_grounded_plus_everything_adds_only_what_the_grounded_masks_do_not_cover() -> None:
    image, expected = shapes()
    detector = BoxDetector({"cat": [(box_of(expected["red"]), 0.8)]})
    found = _run("grounded+everything", _grid(unlabeled_label="object"), detector, image)
    assert sorted(i.label for i in found) == ["cat", "object", "object", "object"]
    assert same_masks([i.mask for i in found], list(expected.values()))
    assert len(detector.calls) == 1  # the grounded route's call; labelling does not detect again


def test_non_overlapping_coverage_gives_each_pixel_to_one_mask() -> None:
    def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        mask = np.zeros((20, 20), bool)
        mask[y0:y1, x0:x1] = True
        return mask

    best = Instance("cat", 0.9, (0, 0, 10, 10), rect(0, 0, 10, 10))
    shifted = Instance("dog", 0.8, (7, 0, 17, 10), rect(7, 0, 17, 10))  # loses 30%: kept, carved
    inside = Instance("dog", 0.7, (1, 1, 9, 9), rect(1, 1, 9, 9))  # loses everything: dropped
    sky = Instance("sky", 0.99, (0, 0, 20, 20), rect(0, 0, 20, 20))  # stuff: last, takes the rest
    kept = make_non_overlapping([sky, inside, shifted, best], frozenset({"sky"}))
    assert [(i.label, i.score) for i in kept] == [("cat", 0.9), ("dog", 0.8), ("sky", 0.99)]
    assert np.array_equal(kept[1].mask, rect(10, 0, 17, 10)) and kept[1].box == (10.0, 0.0, 17.0, 10.0)
    assert np.array_equal(np.sum([i.mask for i in kept], axis=0), np.ones((20, 20)))
    assert drop_covered([shifted], rect(0, 0, 10, 10), 0.5) == [shifted]  # 30% covered
    assert drop_covered([inside], rect(0, 0, 10, 10), 0.5) == []


# ----------------------------------------------------------------------------- modes


def test_mode_selection_changes_model_version_and_only_everything_uses_grid_settings() -> None:
    project = parse_label_config(CONFIG)
    grounded = Settings()
    assert model_version_for(grounded, project) != model_version_for(Settings(prediction_mode="everything"), project)
    assert model_version_for(grounded, project, "everything") == model_version_for(
        Settings(prediction_mode="everything"), project
    )
    assert model_version_for(Settings(points_per_side=8), project) == model_version_for(grounded, project)
    everything = Settings(prediction_mode="everything")
    assert model_version_for(everything.with_overrides(points_per_side=8), project) != model_version_for(
        everything, project
    )
    assert model_version_for(Settings(non_overlapping_masks=True), project) != model_version_for(grounded, project)
    with pytest.raises(ConfigError, match="grounded, everything, grounded\\+everything"):
        model_version_for(grounded, project, "automatic")
    for not_text in (5, ["everything"], {"mode": "everything"}):  # JSON a user may type in extra params
        with pytest.raises(ConfigError, match="prediction_mode must be text, one of grounded, everything"):
            model_version_for(grounded, project, not_text)  # type: ignore[arg-type]
    assert model_version_for(grounded, project).startswith("grounded-sam-grounded-")
    assert model_version_for(grounded, project, "Grounded + Everything").startswith("grounded-sam-grounded+everything-")
    from_env = Settings.from_env({"PREDICTION_MODE": "everything", "LABEL_MODES": '{"sky": "stuff"}'})
    assert from_env.prediction_mode == "everything" and from_env.label_modes == {"sky": "stuff"}
    with pytest.raises(ConfigError, match="PREDICTION_MODE|prediction mode"):
        build_predictor(Settings(prediction_mode="all"), BoxDetector({}), ShapeSegmenter())


def test_predictor_runs_the_mode_it_is_given_per_project() -> None:
    image, expected = shapes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    task = {"id": 1, "data": {"image": data_uri(buffer.getvalue())}}
    settings = Settings(points_per_side=16, unlabeled_label="object")
    predictor = build_predictor(settings, BoxDetector({"dog": [(box_of(expected["disk"]), 0.7)]}), ShapeSegmenter())
    grounded = predictor.predict_tasks([task], CONFIG, Credentials())[0]
    everything = predictor.predict_tasks([task], CONFIG, Credentials(), mode="everything")[0]
    assert [r["value"]["brushlabels"] for r in grounded["result"]] == [["dog"]]
    labels = sorted(r["value"]["brushlabels"][0] for r in everything["result"])
    assert labels == ["dog", "object", "object", "object"]
    masks = [decode_region_mask(r) for r in everything["result"]]
    assert same_masks(masks, list(expected.values()))
    assert everything["model_version"] == predictor.model_version(predictor.project(CONFIG), "everything")
    assert everything["model_version"] != grounded["model_version"]


# ----------------------------------------------------------------------------- tiny SAM


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory: pytest.TempPathFactory) -> SamSegmenter:
    folder: Path = build_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))
    return SamSegmenter(str(folder), max_batch_size=8)


def test_tiny_sam_candidates_cover_the_image_part_of_the_frame(tiny_sam: SamSegmenter) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8))
    embedding = tiny_sam.embed(image)
    prompt = PromptSet(points=[(40.0, 20.0)], point_labels=[1])
    [found] = tiny_sam.segment_candidates(embedding, [prompt])
    assert found.logits.shape == (3, 256, 256) and found.scores.shape == (3,)
    assert found.image_extent == pytest.approx((614 / 4, 256.0))  # 60x100 -> 614x1024 in a 1024 frame
    best = tiny_sam.segment(embedding, [prompt], multimask=True)[0]
    chosen = int(np.argmax(found.scores))
    assert best.score == pytest.approx(float(found.scores[chosen]), abs=1e-5)
    ours = upsample_logits(torch.from_numpy(found.logits[chosen]), found.image_extent, (60, 100))
    # one bilinear step instead of the processor's two: random weights give noisy logits near
    # 0, so a few percent of pixels flip; an extent off by 3.5 cells agreed on only ~62%
    assert (ours == best.mask).mean() > 0.9


def test_tiny_sam_runs_the_grid_end_to_end(tiny_sam: SamSegmenter) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    params = EverythingParams(points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    masks = generate_masks(image, "tiny", tiny_sam, cache(), params)
    assert 0 < len(masks) <= 4 * 4 * 3
    for auto in masks:
        mask = auto.mask
        assert mask.shape == (48, 64) and mask.any() and auto.box == box_of(mask)
    boxes = torch.tensor([m.box for m in masks])
    overlaps = box_iou(boxes, boxes).fill_diagonal_(0)
    assert float(overlaps.max()) <= params.box_nms_thresh
    assert [m.predicted_iou for m in masks] == sorted((m.predicted_iou for m in masks), reverse=True)
