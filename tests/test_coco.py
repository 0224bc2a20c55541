"""COCO export / import / evaluation: exact masks, stable ids, clear errors, no partial files."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.converter import Converter, Format
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend import coco
from backend.commands import coco_commands
from backend.labeling import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.regions import encode_bitmask_png, encode_brush_rle

CONFIG_XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <BitmaskLabels name="bitmask" toName="image"><Label value="fence"/></BitmaskLabels>
  <PolygonLabels name="poly" toName="image"><Label value="tree"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="car"/></RectangleLabels>
</View>"""
CONFIG = parse_label_config(CONFIG_XML)
CATEGORY = {"cat": 1, "dog": 2, "fence": 3, "tree": 4, "car": 5}  # config order, ids from 1


def _base(rid: str, kind: str, from_name: str, width: int, height: int) -> dict[str, Any]:
    return {
        "id": rid,
        "type": kind,
        "from_name": from_name,
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
    }


def brush(mask: np.ndarray, label: str = "cat", rid: str = "b1", **extra: Any) -> dict[str, Any]:
    height, width = mask.shape
    value = {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [label]}
    return {**_base(rid, "brushlabels", "brush", width, height), "value": value, **extra}


def bitmask(mask: np.ndarray, label: str = "fence", rid: str = "m1") -> dict[str, Any]:
    height, width = mask.shape
    value = {"imageDataURL": encode_bitmask_png(mask), "bitmasklabels": [label]}
    return {**_base(rid, "bitmasklabels", "bitmask", width, height), "value": value}


def polygon(points: list[list[float]], width: int, height: int, label: str = "tree", rid: str = "p1") -> dict:
    value = {"points": points, "closed": True, "polygonlabels": [label]}
    return {**_base(rid, "polygonlabels", "poly", width, height), "value": value}


def rectangle(x: float, y: float, w: float, h: float, width: int, height: int, rotation: float = 0, rid: str = "r1"):
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": ["car"]}
    return {**_base(rid, "rectanglelabels", "box", width, height), "value": value}


def task(tid: int, *annotations: list[dict], predictions: list[dict] | None = None, image: str | None = None):
    return {
        "id": tid,
        "data": {"image": image or f"/data/upload/1/0123abcd-img{tid}.png"},
        "annotations": [
            {"id": tid * 10 + i, "result": result, "was_cancelled": False, "ground_truth": False}
            for i, result in enumerate(annotations)
        ],
        "predictions": predictions or [],
    }


def prediction(*results: dict, score: float | None = None, version: str = "v1", pid: int = 1) -> dict:
    out: dict[str, Any] = {"id": pid, "model_version": version, "result": list(results)}
    if score is not None:
        out["score"] = score
    return out


def decode(segmentation: dict) -> np.ndarray:
    return coco_mask.decode(segmentation).astype(bool)


def rasterise(rings: list[list[float]], width: int, height: int) -> np.ndarray:
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(rings, height, width))).astype(bool)


def hard_mask() -> np.ndarray:
    """Non-square; a ring with a hole, an island inside the hole, and two 1-pixel parts."""
    mask = np.zeros((23, 41), dtype=bool)
    mask[2:18, 3:25] = True
    mask[6:14, 8:20] = False  # hole
    mask[9:11, 12:15] = True  # island in the hole
    mask[20, 35] = True  # 1-pixel part
    mask[0, 40] = True  # 1-pixel part in the corner
    return mask


def test_hard_mask_has_the_features_the_tests_rely_on() -> None:
    mask = hard_mask()
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    assert count - 1 == 4
    assert sorted(stats[1:, cv2.CC_STAT_AREA])[:2] == [1, 1]
    assert any(h[3] >= 0 for h in hierarchy[0])  # a hole


# --------------------------------------------------------------------------- lossless masks


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """Non-square masks of rectangles, some with holes, plus isolated 1-pixel parts."""
    height = draw(st.integers(6, 40))
    width = draw(st.integers(6, 40).filter(lambda w: w != height))
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(draw(st.integers(1, 4))):
        y0, x0 = draw(st.integers(0, height - 5)), draw(st.integers(0, width - 5))
        y1, x1 = draw(st.integers(y0 + 5, height)), draw(st.integers(x0 + 5, width))
        mask[y0:y1, x0:x1] = True
        if draw(st.booleans()):
            hy, hx = draw(st.integers(y0 + 1, y1 - 3)), draw(st.integers(x0 + 1, x1 - 3))
            mask[hy : draw(st.integers(hy + 1, y1 - 1)), hx : draw(st.integers(hx + 1, x1 - 1))] = False
    for _ in range(draw(st.integers(1, 3))):
        y, x = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = False
        mask[y, x] = True
    return mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=masks())
def test_brush_export_is_pixel_exact(mask: np.ndarray) -> None:
    dataset = coco.ls_to_coco([task(1, [brush(mask)])], CONFIG)
    (ann,) = dataset["annotations"]
    assert np.array_equal(decode(ann["segmentation"]), mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert ann["area"] == int(mask.sum())
    assert ann["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
    assert dataset["images"][0]["width"] == mask.shape[1] and dataset["images"][0]["height"] == mask.shape[0]


def test_bitmask_export_is_pixel_exact() -> None:
    mask = hard_mask()
    dataset = coco.ls_to_coco([task(1, [bitmask(mask)])], CONFIG)
    assert np.array_equal(decode(dataset["annotations"][0]["segmentation"]), mask)
    assert dataset["annotations"][0]["category_id"] == CATEGORY["fence"]


def test_sdk_brush_to_coco_loses_holes_and_small_parts(tmp_path: Path) -> None:
    """Why this module exists: Label Studio's own converter, on the same task, is not exact."""
    mask = hard_mask()
    source = tmp_path / "export.json"
    source.write_text(json.dumps([task(1, [brush(mask)])]))
    Converter(CONFIG_XML, project_dir=str(tmp_path), download_resources=False).convert(
        str(source), str(tmp_path / "sdk"), Format.BRUSH_TO_COCO, is_dir=False
    )
    sdk = json.loads((tmp_path / "sdk" / "result_coco.json").read_text())
    rings = [[float(v) for v in ring] for ann in sdk["annotations"] for ring in ann["segmentation"]]
    theirs = rasterise(rings, mask.shape[1], mask.shape[0])
    assert theirs[8, 10] and not mask[8, 10]  # the hole is filled
    assert not theirs[20, 35]  # the 1-pixel part is gone
    assert not np.array_equal(theirs, mask)
    ours = coco.ls_to_coco([task(1, [brush(mask)])], CONFIG)
    assert np.array_equal(decode(ours["annotations"][0]["segmentation"]), mask)


def test_polygon_mode_traces_outer_rings_of_every_part() -> None:
    mask = hard_mask()
    dataset = coco.ls_to_coco([task(1, [brush(mask)])], CONFIG, segmentation="polygon", polygon_tolerance=0)
    (ann,) = dataset["annotations"]
    assert isinstance(ann["segmentation"], list) and len(ann["segmentation"]) == 4  # one ring per part
    drawn = rasterise(ann["segmentation"], 41, 23)
    filled = mask.copy()
    filled[6:14, 8:20] = True  # COCO polygons cannot have holes: documented as lossy
    assert np.array_equal(drawn, filled)
    assert ann["area"] == int(filled.sum())


# --------------------------------------------------------------------------- vertices, names, ids


def test_polygons_and_rectangles_become_pixel_vertices() -> None:
    width, height = 200, 100
    tasks = [
        task(
            1,
            [
                polygon([[10, 20], [50, 20], [50, 60]], width, height),
                rectangle(10, 20, 30, 40, width, height),
                rectangle(10, 20, 30, 40, width, height, rotation=90, rid="r2"),
            ],
        )
    ]
    poly, rect, rotated = coco.ls_to_coco(tasks, CONFIG)["annotations"]
    assert poly["segmentation"] == [[20.0, 20.0, 100.0, 20.0, 100.0, 60.0]]
    assert poly["bbox"] == [20.0, 20.0, 80.0, 40.0]
    assert poly["category_id"] == CATEGORY["tree"]
    assert rect["segmentation"] == [[20.0, 20.0, 80.0, 20.0, 80.0, 60.0, 20.0, 60.0]]
    assert rect["bbox"] == [20.0, 20.0, 60.0, 40.0] and rect["area"] == 60 * 40
    # rotated 90 degrees clockwise about the top-left corner (20, 20): x extends to the left
    assert rotated["segmentation"] == [[20.0, 20.0, 20.0, 80.0, -20.0, 80.0, -20.0, 20.0]]
    assert rotated["bbox"] == [-20.0, 20.0, 40.0, 60.0]


def test_categories_follow_the_config_else_the_sorted_labels_seen() -> None:
    assert coco.categories([], CONFIG) == [{"id": i, "name": n, "supercategory": ""} for n, i in CATEGORY.items()]
    mask = hard_mask()
    tasks = [
        task(
            1,
            [brush(mask, "zebra"), brush(mask, "ant", rid="b2")],
            predictions=[prediction(brush(mask, "mole"))],
        )
    ]
    assert [c["name"] for c in coco.categories(tasks)] == ["ant", "mole", "zebra"]
    dataset = coco.ls_to_coco(tasks)
    assert [a["category_id"] for a in dataset["annotations"]] == [3, 1]


def test_file_names_strip_the_upload_prefix_and_keep_it_on_collision() -> None:
    mask = hard_mask()
    tasks = [
        task(1, [brush(mask)], image="/data/upload/4/deadbeef-photo.png"),
        task(2, [brush(mask)], image="/data/upload/4/0badf00d-photo.png"),
        task(3, [brush(mask)], image="/data/upload/4/cafebabe-dog%20run.jpg"),
        task(4, [brush(mask)], image="https://example.com/a/b/street.jpg?sig=1"),
        task(5, [brush(mask)], image="/data/local-files/?d=datasets/set1/img.png"),
    ]
    names = [img["file_name"] for img in coco.ls_to_coco(tasks, CONFIG)["images"]]
    assert names == ["deadbeef-photo.png", "0badf00d-photo.png", "dog run.jpg", "street.jpg", "img.png"]
    kept = [img["file_name"] for img in coco.ls_to_coco(tasks, CONFIG, keep_paths=True)["images"]]
    assert kept == [t["data"]["image"] for t in tasks]
    assert [img["id"] for img in coco.ls_to_coco(tasks, CONFIG)["images"]] == [1, 2, 3, 4, 5]


def test_annotation_choice_latest_all_ground_truth_and_cancelled() -> None:
    a, b, c = (np.zeros((8, 9), dtype=bool) for _ in range(3))
    a[1, 1], b[2, 2], c[3, 3] = True, True, True
    t = task(1, [brush(a)], [brush(b)], [brush(c)])
    t["annotations"][0].update(updated_at="2024-01-03T00:00:00Z", ground_truth=True)
    t["annotations"][1].update(updated_at="2024-01-05T00:00:00Z")
    t["annotations"][2].update(updated_at="2024-01-09T00:00:00Z", was_cancelled=True)
    area = {"latest": [(2, 2)], "all": [(1, 1), (2, 2)], "ground-truth": [(1, 1)]}
    for choice, expected in area.items():
        anns = coco.ls_to_coco([t], CONFIG, annotations=choice)["annotations"]
        assert [tuple(int(v) for v in ann["bbox"][:2]) for ann in anns] == expected, choice
    no_gt = task(2, [brush(a)])
    dataset = coco.ls_to_coco([t, no_gt], CONFIG, annotations="ground-truth")
    assert [img["id"] for img in dataset["images"]] == [1]


def test_empty_annotation_is_an_image_without_objects_sized_from_meta() -> None:
    t = task(3, [])
    t["meta"] = {"original_width": 30, "original_height": 20}
    dataset = coco.ls_to_coco([t, task(4, [brush(hard_mask())])], CONFIG)
    assert dataset["images"][0] == {"id": 3, "file_name": "img3.png", "width": 30, "height": 20}
    assert [a["image_id"] for a in dataset["annotations"]] == [4]


# --------------------------------------------------------------------------- errors


def test_unknown_label_names_the_task() -> None:
    with pytest.raises(coco.CocoError, match=r"task 7\b.*'horse' is not in the label config"):
        coco.ls_to_coco([task(7, [brush(hard_mask(), "horse")])], CONFIG)


def test_regions_of_model_skip_controls_are_still_exported() -> None:
    skipped = parse_label_config(CONFIG_XML.replace('name="poly"', 'name="poly" model_skip="true"'))
    dataset = coco.ls_to_coco([task(3, [polygon([[10, 10], [60, 10], [60, 50]], 40, 30)])], skipped)
    assert [c["name"] for c in dataset["categories"]] == list(CATEGORY)
    assert [a["category_id"] for a in dataset["annotations"]] == [CATEGORY["tree"]]


def test_rle_of_the_wrong_size_names_the_task() -> None:
    region = brush(hard_mask())
    region["original_width"] = 40  # the RLE was made for 41 x 23
    with pytest.raises(coco.CocoError, match=r"task 8\b.*region 'b1'.*RLE"):
        coco.ls_to_coco([task(8, [region])], CONFIG)


def test_missing_sizes_name_the_task() -> None:
    region = polygon([[1, 1], [5, 1], [5, 5]], 10, 10)
    del region["original_width"], region["original_height"]
    with pytest.raises(coco.CocoError, match=r"task 9\b.*original_width"):
        coco.ls_to_coco([task(9, [region])], CONFIG)


def test_empty_project_and_no_usable_annotation_are_errors() -> None:
    with pytest.raises(coco.CocoError, match="empty"):
        coco.ls_to_coco([], CONFIG)
    with pytest.raises(coco.CocoError, match="empty"):
        coco.as_tasks([])
    cancelled = task(1, [brush(hard_mask())])
    cancelled["annotations"][0]["was_cancelled"] = True
    with pytest.raises(coco.CocoError, match="none of the 1 tasks"):
        coco.ls_to_coco([cancelled], CONFIG)


def test_predictions_need_a_model_version_when_several_exist() -> None:
    mask = hard_mask()
    t = task(
        1,
        [brush(mask)],
        predictions=[prediction(brush(mask), version="a"), prediction(brush(mask), version="b")],
    )
    with pytest.raises(coco.CocoError, match=r"\['a', 'b'\]"):
        coco.ls_to_coco_results([t], CONFIG)
    assert len(coco.ls_to_coco_results([t], CONFIG, model_version="b")) == 1
    with pytest.raises(coco.CocoError, match="'c'"):
        coco.ls_to_coco_results([t], CONFIG, model_version="c")


def test_predictions_listed_by_id_point_to_the_live_project() -> None:
    quick_export = task(1, [brush(hard_mask())], predictions=[41, 42])  # Label Studio's JSON export shape
    with pytest.raises(coco.CocoError, match="by id only.*--project"):
        coco.ls_to_coco_results([quick_export], CONFIG)


# --------------------------------------------------------------------------- predictions, pycocotools


def test_results_carry_region_scores_and_load_in_pycocotools(tmp_path: Path) -> None:
    mask = hard_mask()
    rect = rectangle(10, 10, 20, 30, 41, 23, rid="r9")
    tasks = [task(1, [brush(mask)], predictions=[prediction(brush(mask, score=0.75), rect, score=0.5)])]
    results = coco.ls_to_coco_results(tasks, CONFIG)
    assert [r["score"] for r in results] == [0.75, 0.5]  # region score, else the prediction's
    assert np.array_equal(decode(results[0]["segmentation"]), mask)
    assert [r["category_id"] for r in results] == [CATEGORY["cat"], CATEGORY["car"]]
    dataset_path = tmp_path / "gt.json"
    coco.write_json_atomic(dataset_path, coco.ls_to_coco(tasks, CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt = COCO(str(dataset_path))
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
    assert gt.getCatIds() == list(CATEGORY.values())


# --------------------------------------------------------------------------- evaluation


def _square(size: tuple[int, int], x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def _gt_and_predictions(gt_masks: list[np.ndarray], pred_masks: list[tuple[np.ndarray, float]]) -> tuple:
    tasks = [
        task(
            1,
            [brush(m, rid=f"g{i}") for i, m in enumerate(gt_masks)],
            predictions=[prediction(*(brush(m, rid=f"d{i}", score=s) for i, (m, s) in enumerate(pred_masks)))],
        )
    ]
    return coco.ls_to_coco(tasks, CONFIG), coco.ls_to_coco_results(tasks, CONFIG)


def test_evaluate_identical_is_one_and_disjoint_is_zero() -> None:
    size = (64, 80)
    gt, results = _gt_and_predictions([_square(size, 10, 10, 20)], [(_square(size, 10, 10, 20), 0.9)])
    report = coco.evaluate(gt, results)
    assert report["segm"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})  # 101-point mean
    assert report["bbox"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    assert report["mean_iou"] == 1.0
    cat = report["per_category"]["cat"]
    assert cat["AP_segm"] == pytest.approx(1.0)
    assert (cat["gt"], cat["matched"], cat["missed"], cat["extra"]) == (1, 1, 0, 0)
    assert report["per_category"]["dog"]["AP_segm"] is None  # no ground truth: no AP, not 0

    gt, results = _gt_and_predictions([_square(size, 10, 10, 20)], [(_square(size, 50, 30, 20), 0.9)])
    report = coco.evaluate(gt, results)
    assert report["segm"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert report["mean_iou"] is None
    cat = report["per_category"]["cat"]
    assert (cat["matched"], cat["missed"], cat["extra"]) == (0, 1, 1)


@pytest.mark.parametrize("shift", [3, 4, 7])
def test_evaluate_shifted_mask_gives_the_independently_computed_ap(shift: int) -> None:
    size = (64, 80)
    truth, predicted = _square(size, 10, 10, 20), _square(size, 10 + shift, 10, 20)
    iou = (truth & predicted).sum() / (truth | predicted).sum()
    thresholds = np.linspace(0.5, 0.95, 10)
    assert np.abs(thresholds - iou).min() > 1e-3  # not on a threshold: the expectation is unambiguous
    expected_ap = float(np.mean(iou >= thresholds))  # one object matched or not per threshold
    gt, results = _gt_and_predictions([truth], [(predicted, 0.8)])
    report = coco.evaluate(gt, results)
    assert report["segm"]["AP"] == pytest.approx(expected_ap)
    assert report["segm"]["AP50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)
    assert report["segm"]["AP75"] == pytest.approx(1.0 if iou >= 0.75 else 0.0)
    assert report["bbox"]["AP"] == pytest.approx(expected_ap)  # squares: box IoU = mask IoU
    if iou >= 0.5:
        assert report["mean_iou"] == pytest.approx(iou)


def test_evaluate_counts_missed_and_extra_per_label_above_a_score_threshold() -> None:
    size = (64, 80)
    a, b, far = _square(size, 2, 2, 10), _square(size, 40, 40, 12), _square(size, 60, 5, 8)
    gt, results = _gt_and_predictions([a, b], [(a, 0.9), (far, 0.3)])
    counts = coco.evaluate(gt, results)["per_category"]["cat"]
    assert (counts["gt"], counts["predicted"], counts["matched"], counts["missed"], counts["extra"]) == (
        2,
        2,
        1,
        1,
        1,
    )
    high = coco.evaluate(gt, results, score_threshold=0.5)["per_category"]["cat"]
    assert (high["predicted"], high["extra"]) == (1, 0)
    with pytest.raises(ValueError, match="iou_threshold"):
        coco.evaluate(gt, results, iou_threshold=0.52)


def test_evaluate_accepts_ground_truth_without_iscrowd_and_area() -> None:
    size = (30, 40)
    gt, results = _gt_and_predictions([_square(size, 2, 2, 9)], [(_square(size, 2, 2, 9), 0.9)])
    for ann in gt["annotations"]:
        del ann["iscrowd"], ann["area"]
    assert coco.evaluate(gt, results)["segm"]["AP"] == pytest.approx(1.0)


def test_evaluate_ignores_predictions_outside_the_ground_truth_images() -> None:
    size = (30, 40)
    gt, results = _gt_and_predictions([_square(size, 2, 2, 9)], [(_square(size, 2, 2, 9), 0.9)])
    stray = {**results[0], "image_id": 999}
    report = coco.evaluate(gt, [*results, stray])
    assert (report["predictions"], report["ignored"]) == (1, 1)
    assert report["segm"]["AP"] == pytest.approx(1.0)
    assert coco.evaluate(gt, [])["segm"]["AP"] == 0.0
    table = coco.format_evaluation(report)
    assert "segm" in table and "cat" in table and "1.000" in table


# --------------------------------------------------------------------------- import, round trip


def _round_trip_tasks() -> list[dict]:
    rng = np.random.default_rng(5)
    noisy = rng.random((23, 41)) > 0.5
    return [
        task(
            11,
            [
                brush(hard_mask()),
                brush(noisy, "dog", rid="b2"),
                bitmask(hard_mask()[::-1]),
                polygon([[10.123456, 20.5], [50.77, 20.1], [33.3, 80.9]], 41, 23),
                rectangle(10.3, 20.7, 30.1, 40.2, 41, 23),
            ],
            image="/data/upload/2/89abcdef-scene.png",
        ),
        task(12, [polygon([[1, 1], [60, 3], [40, 90], [5, 50]], 97, 31, rid="p2")]),
    ]


def test_export_import_export_is_identical() -> None:
    first = coco.ls_to_coco(_round_trip_tasks(), CONFIG)
    tasks = coco.coco_to_ls(first, CONFIG, image_root="/data/local-files/?d=imgs/", as_annotations=True)
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=imgs/scene.png"
    types = [r["type"] for r in tasks[0]["annotations"][0]["result"]]
    assert types == ["brushlabels", "brushlabels", "bitmasklabels", "polygonlabels", "rectanglelabels"]
    assert coco.ls_to_coco(tasks, CONFIG) == first
    polygon_mode = coco.ls_to_coco(_round_trip_tasks(), CONFIG, segmentation="polygon")
    assert (
        coco.ls_to_coco(coco.coco_to_ls(polygon_mode, CONFIG, as_annotations=True), CONFIG)["annotations"][3:]
        == (
            polygon_mode["annotations"][3:]  # LS polygons and rectangles keep their vertices in polygon mode too
        )
    )


def test_results_import_export_is_identical_and_keeps_scores() -> None:
    mask = hard_mask()
    tasks = [
        task(
            1,
            [brush(mask)],
            predictions=[prediction(brush(mask, score=0.25), brush(mask[::-1], "dog", score=0.75))],
        )
    ]
    dataset, results = coco.ls_to_coco(tasks, CONFIG), coco.ls_to_coco_results(tasks, CONFIG)
    imported = coco.coco_to_ls(dataset, CONFIG, results=results, model_version="m2")
    (pred,) = imported[0]["predictions"]
    assert pred["model_version"] == "m2" and pred["score"] == pytest.approx(0.5)
    assert "annotations" not in imported[0]  # results replace the dataset's objects as predictions
    assert coco.ls_to_coco_results(imported, CONFIG) == results


def test_import_picks_the_control_that_keeps_the_shape() -> None:
    config = parse_label_config(
        """<View><Image name="img" value="$photo"/>
        <RectangleLabels name="rect" toName="img"><Label value="cat"/></RectangleLabels>
        <PolygonLabels name="poly" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>
        </View>"""
    )
    rle = coco._rle_geometry(_square((20, 30), 2, 3, 5)).segmentation
    dataset = {
        "images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "segmentation": [], "bbox": [1.5, 2, 3, 4]},
            {
                "id": 2,
                "image_id": 5,
                "category_id": 1,
                "segmentation": [[1, 1, 9, 1, 9, 9]],
                "bbox": [1, 1, 8, 8],
            },
            {"id": 3, "image_id": 5, "category_id": 2, "segmentation": rle, "bbox": [2, 3, 5, 5]},
        ],
    }
    (t,) = coco.coco_to_ls(dataset, config, image_root="https://host/imgs")
    assert t["data"] == {"photo": "https://host/imgs/a.png"} and t["id"] == 5
    box, poly, traced = t["predictions"][0]["result"]
    assert (box["type"], box["from_name"], box["to_name"]) == ("rectanglelabels", "rect", "img")
    assert box["value"]["x"] == pytest.approx(1.5 / 30 * 100) and box["value"]["height"] == pytest.approx(20.0)
    assert poly["type"] == "polygonlabels" and poly["value"]["points"][1] == pytest.approx([30.0, 5.0])
    assert traced["type"] == "polygonlabels" and traced["value"]["polygonlabels"] == ["dog"]  # no brush: traced
    assert "score" not in box and "score" not in t["predictions"][0]


def test_import_errors_name_the_image() -> None:
    dataset = {
        "images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
        "categories": [{"id": 1, "name": "horse"}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]}],
    }
    with pytest.raises(coco.CocoError, match=r"image 5 \(a.png\).*'horse' is not a label"):
        coco.coco_to_ls(dataset, CONFIG)
    dataset["categories"] = [{"id": 1, "name": "cat"}]
    dataset["annotations"][0]["segmentation"] = {"size": [21, 30], "counts": "0"}
    with pytest.raises(coco.CocoError, match=r"image 5 \(a.png\).*RLE size"):
        coco.coco_to_ls(dataset, CONFIG)
    with pytest.raises(coco.CocoError, match="image_id 6"):
        coco.coco_to_ls({**dataset, "annotations": []}, CONFIG, results=[{"image_id": 6, "category_id": 1}])


# --------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="grounded-sam-backend")
    coco_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def project_files(tmp_path: Path) -> tuple[Path, Path]:
    mask = hard_mask()
    tasks = [
        task(
            1,
            [brush(mask), rectangle(10, 10, 20, 30, 41, 23)],
            predictions=[prediction(brush(mask, score=0.9))],
        ),
        task(2, [brush(mask[::-1], "dog")], predictions=[prediction(brush(mask[::-1], "dog", score=0.6))]),
    ]
    export, config = tmp_path / "export.json", tmp_path / "config.xml"
    export.write_text(json.dumps(tasks))
    config.write_text(CONFIG_XML)
    return export, config


def test_cli_export_import_evaluate(tmp_path: Path, project_files: tuple[Path, Path], capsys) -> None:
    export, config = project_files
    cfg = ["--label-config", str(config)]
    out, preds = tmp_path / "out" / "coco.json", tmp_path / "preds.json"
    assert run_cli("export-coco", str(export), *cfg, "-o", str(out), "--predictions", str(preds)) == 0
    dataset = json.loads(out.read_text())
    assert [c["name"] for c in dataset["categories"]] == list(CATEGORY)
    assert np.array_equal(decode(dataset["annotations"][0]["segmentation"]), hard_mask())
    assert len(json.loads(preds.read_text())) == 2

    tasks_out = tmp_path / "import.json"
    images = ["--images", "/data/local-files/?d=x/"]
    assert run_cli("import-coco", str(out), *cfg, *images, "--as-annotations", "-o", str(tasks_out)) == 0
    again = tmp_path / "again.json"
    assert run_cli("export-coco", str(tasks_out), *cfg, "-o", str(again)) == 0
    assert json.loads(again.read_text()) == dataset

    report_path = tmp_path / "report.json"
    capsys.readouterr()
    assert run_cli("evaluate", str(export), "--label-config", str(config), "--json", str(report_path)) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["per_category"]["cat"]["matched"] == 1 and report["per_category"]["car"]["missed"] == 1
    assert "AP50" in table and "car" in table
    assert run_cli("evaluate", "--coco", str(out), "--results", str(preds), "--json", "-") == 0
    assert json.loads(capsys.readouterr().out)["segm"] == report["segm"]

    yolo_dir = tmp_path / "yolo"
    assert run_cli("export-yolo", str(export), "--label-config", str(config), "-o", str(yolo_dir)) == 0
    assert sorted(p.name for p in (yolo_dir / "labels").iterdir()) == ["img1.txt", "img2.txt"]


def test_cli_error_names_the_task_and_writes_nothing(tmp_path: Path, project_files: tuple[Path, Path], capsys) -> None:
    export, config = project_files
    tasks = json.loads(export.read_text())
    tasks[1]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["unicorn"]
    export.write_text(json.dumps(tasks))
    out, preds = tmp_path / "coco.json", tmp_path / "preds.json"
    out.write_text("previous")
    code = run_cli(
        "export-coco", str(export), "--label-config", str(config), "-o", str(out), "--predictions", str(preds)
    )
    assert code == 1
    assert "task 2" in capsys.readouterr().err
    assert out.read_text() == "previous" and not preds.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "coco.json",
        "config.xml",
        "export.json",
    ]  # no temp files
    assert run_cli("export-coco", str(tmp_path / "missing.json"), "-o", str(out)) == 1
    assert "missing.json" in capsys.readouterr().err


def test_write_json_atomic_leaves_the_old_file_when_serialising_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        coco.write_json_atomic(target, {"bad": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# --------------------------------------------------------------------------- Label Studio client


def fake_label_studio(seen_pages: list[int]) -> httpx.Client:
    """A two-page project 3 behind httpx's mock transport, paged like Label Studio (404 at the end)."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Token secret"
        if request.url.path == "/api/projects/3/":
            return httpx.Response(200, json={"id": 3, "label_config": CONFIG_XML})
        assert request.url.params["project"] == "3" and request.url.params["fields"] == "all"
        page = int(request.url.params["page"])
        seen_pages.append(page)
        if page > 2:
            return httpx.Response(404, json={"detail": "Invalid page."})
        tasks = [task(page * 10 + i, [brush(hard_mask())]) for i in range(2)]
        return httpx.Response(200, json={"tasks": tasks, "total": 4, "total_annotations": 4, "total_predictions": 0})

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_client_pages_through_tasks_and_fetches_the_config() -> None:
    seen: list[int] = []
    client = LabelStudioClient("http://ls.test/", "secret", page_size=2, httpx_client=fake_label_studio(seen))
    assert parse_label_config(client.get_label_config(3)) == CONFIG
    tasks = client.export_tasks(3)
    assert [t["id"] for t in tasks] == [10, 11, 20, 21] and seen == [1, 2, 3]
    dataset = coco.ls_to_coco(tasks, CONFIG)
    assert np.array_equal(decode(dataset["annotations"][0]["segmentation"]), hard_mask())


def test_cli_reads_a_live_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def client(args: argparse.Namespace) -> LabelStudioClient:
        assert (args.ls_url, args.api_key, args.project) == ("http://ls.test", "secret", 3)
        return LabelStudioClient(args.ls_url, args.api_key, page_size=2, httpx_client=fake_label_studio([]))

    monkeypatch.setattr(coco_commands, "_client", client)
    out = tmp_path / "coco.json"
    live = ["--ls-url", "http://ls.test", "--api-key", "secret", "--project", "3"]
    assert run_cli("export-coco", *live, "-o", str(out)) == 0
    dataset = json.loads(out.read_text())
    assert [img["id"] for img in dataset["images"]] == [10, 11, 20, 21]
    assert [c["name"] for c in dataset["categories"]] == list(CATEGORY)  # the project's config, fetched
    assert run_cli("export-coco", str(out), *live, "-o", str(out)) == 1  # a file and a project: ambiguous
