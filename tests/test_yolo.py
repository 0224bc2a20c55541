"""YOLO segmentation export: one bridged polygon per object, holes and 1-pixel parts kept."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from backend import coco, yolo
from backend.labeling import parse_label_config
from backend.regions import encode_brush_rle

CONFIG = parse_label_config(
    """<View><Image name="image" value="$image"/>
    <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
    </View>"""
)


def hard_mask() -> np.ndarray:
    """Non-square; a ring with a hole, an island inside the hole, and two 1-pixel parts."""
    mask = np.zeros((23, 41), dtype=bool)
    mask[2:18, 3:25] = True
    mask[6:14, 8:20] = False
    mask[9:11, 12:15] = True
    mask[20, 35] = True
    mask[0, 40] = True
    return mask


def brush_task(tid: int, image: str, *masks: tuple[np.ndarray, str]) -> dict:
    results = [
        {
            "id": f"r{i}",
            "type": "brushlabels",
            "from_name": "brush",
            "to_name": "image",
            "original_width": mask.shape[1],
            "original_height": mask.shape[0],
            "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [label]},
        }
        for i, (mask, label) in enumerate(masks)
    ]
    return {"id": tid, "data": {"image": image}, "annotations": [{"id": tid, "result": results}]}


def rasterise_line(line: str, width: int, height: int) -> tuple[int, np.ndarray]:
    """pycocotools' (even-odd) rasterisation of one YOLO label line."""
    values = line.split()
    coords = np.array([float(v) for v in values[1:]]).reshape(-1, 2) * (width, height)
    rle = coco_mask.frPyObjects([coords.ravel().tolist()], height, width)
    return int(values[0]), coco_mask.decode(rle)[:, :, 0].astype(bool)


def test_holes_islands_and_single_pixels_survive_one_polygon() -> None:
    mask = hard_mask()
    polygon = yolo.mask_to_yolo_polygon(mask, polygon_tolerance=0)
    drawn = coco_mask.decode(coco_mask.frPyObjects([polygon.ravel().tolist()], 23, 41))[:, :, 0].astype(bool)
    assert np.array_equal(drawn, mask)
    # Ultralytics rasterises label polygons with cv2.fillPoly: holes stay empty there too
    filled = np.zeros(mask.shape, dtype=np.uint8)
    cv2.fillPoly(filled, [np.round(polygon).astype(np.int32)], 1)
    assert filled[8, 9] == 0 and filled[12, 17] == 0  # inside the hole
    assert filled[9, 13] == 1 and filled[20, 35] == 1 and filled[0, 40] == 1  # island, single pixels


def test_empty_mask_has_no_polygon() -> None:
    assert yolo.mask_to_yolo_polygon(np.zeros((4, 5), dtype=bool)) is None


def test_tolerance_trades_vertices_for_a_close_outline() -> None:
    mask = np.zeros((90, 140), dtype=np.uint8)
    cv2.ellipse(mask, (70, 45), (50, 30), 20, 0, 360, 1, -1)
    mask = mask.astype(bool)
    exact, simple = yolo.mask_to_yolo_polygon(mask, 0), yolo.mask_to_yolo_polygon(mask, 1.0)
    assert len(simple) < len(exact) / 3
    drawn = coco_mask.decode(coco_mask.frPyObjects([simple.ravel().tolist()], 90, 140))[:, :, 0].astype(bool)
    assert (drawn & mask).sum() / (drawn | mask).sum() > 0.97


@st.composite
def blob_masks(draw: st.DrawFn) -> np.ndarray:
    height, width = draw(st.integers(5, 30)), draw(st.integers(5, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((height, width)) > draw(st.floats(0.2, 0.8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=blob_masks())
def test_outline_is_within_half_a_pixel_of_any_mask(mask: np.ndarray) -> None:
    """Only pixels on the mask's boundary may differ (diagonal steps are cut at pixel centres)."""
    polygon = yolo.mask_to_yolo_polygon(mask, polygon_tolerance=0)
    if not mask.any():
        assert polygon is None
        return
    height, width = mask.shape
    drawn = coco_mask.decode(coco_mask.frPyObjects([polygon.ravel().tolist()], height, width))[:, :, 0]
    kernel = np.ones((3, 3), np.uint8)
    boundary = cv2.dilate(mask.astype(np.uint8), kernel) != cv2.erode(mask.astype(np.uint8), kernel)
    assert not (drawn.astype(bool) != mask)[~boundary].any()


def test_write_yolo_files(tmp_path: Path) -> None:
    ring = hard_mask()
    empty = brush_task(2, "https://example.com/x/empty.jpg")
    empty["meta"] = {"original_width": 8, "original_height": 6}  # as import-coco writes it
    tasks = [brush_task(1, "/data/upload/1/0123abcd-street.png", (ring, "dog"), (ring[::-1], "cat")), empty]
    dataset = coco.ls_to_coco(tasks, CONFIG)
    files = yolo.write_yolo(dataset, tmp_path / "yolo", polygon_tolerance=0)
    assert sorted(files) == ["data.yaml", "labels/empty.txt", "labels/street.txt"]
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "cat", 1: "dog"} and data["train"] == "images"
    lines = (tmp_path / "yolo" / "labels" / "street.txt").read_text().splitlines()
    decoded = [rasterise_line(line, 41, 23) for line in lines]
    assert [cls for cls, _ in decoded] == [1, 0]  # config order: cat = 0, dog = 1
    assert np.array_equal(decoded[0][1], ring) and np.array_equal(decoded[1][1], ring[::-1])
    assert all(0.0 <= float(v) <= 1.0 for line in lines for v in line.split()[1:])
    assert (tmp_path / "yolo" / "labels" / "empty.txt").read_text() == ""  # a background image


def test_label_file_collisions_fail_before_writing(tmp_path: Path) -> None:
    tasks = [
        brush_task(1, "https://a.example/street.png", (hard_mask(), "cat")),
        brush_task(2, "https://b.example/street.jpg", (hard_mask(), "cat")),
    ]
    with pytest.raises(coco.CocoError, match=r"images 1 and 2 .*labels/street.txt"):
        yolo.write_yolo(coco.ls_to_coco(tasks, CONFIG), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rewrite_replaces_labels_and_keeps_images(tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "gone.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n")  # an image no longer exported
    (out / "images").mkdir()
    (out / "images" / "street.png").write_bytes(b"png")
    (out / "data.yaml").write_text("names: {0: old}\n")
    dataset = coco.ls_to_coco([brush_task(1, "/data/upload/1/0123abcd-street.png", (hard_mask(), "cat"))], CONFIG)
    yolo.write_yolo(dataset, out)
    assert sorted(_files(out)) == ["data.yaml", "images/street.png", "labels/street.txt"]
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "cat", 1: "dog"}
    assert [p.name for p in tmp_path.iterdir()] == ["yolo"]  # no temporary directory left beside it


def test_failed_write_leaves_the_previous_export(tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    yolo.write_yolo(coco.ls_to_coco([brush_task(1, "https://h/old.png", (hard_mask(), "dog"))], CONFIG), out)
    before = _files(out)
    tasks = [
        brush_task(2, "https://h/new.png", (hard_mask(), "cat")),
        brush_task(3, "https://h/" + "n" * 300 + ".png", (hard_mask(), "cat")),  # too long a file name
    ]
    with pytest.raises(OSError):
        yolo.write_yolo(coco.ls_to_coco(tasks, CONFIG), out)
    assert _files(out) == before  # neither new.txt nor a changed data.yaml
    assert [p.name for p in tmp_path.iterdir()] == ["yolo"]


def test_a_new_export_folder_gets_its_parent_folders_permissions(tmp_path: Path) -> None:
    parent = tmp_path / "exports"
    parent.mkdir(mode=0o755)
    parent.chmod(0o755)
    yolo.write_yolo(coco.ls_to_coco([brush_task(1, "https://h/a.png", (hard_mask(), "dog"))], CONFIG), parent / "yolo")
    assert (parent / "yolo").stat().st_mode & 0o777 == 0o755
