"""Geometry of Label Studio regions: exact pixels through brush RLE, bitmask PNG, polygons, boxes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface.control_tags import BitmaskLabelsValue
from PIL import Image

from backend.labeling import LabelSpec, OutputControl
from backend.regions import (
    Instance,
    decode_region_mask,
    encode_instance,
    mask_to_polygons,
    remove_small_regions,
)


def control(kind: str) -> OutputControl:
    return OutputControl(name=kind[:4], type=kind, to_name="image", labels=(LabelSpec("cat", ("cat",)),))


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def ring_and_blob(width: int = 200, height: int = 120) -> np.ndarray:
    """A square with a square hole (holding an island) plus a separate blob."""
    mask = box_mask(width, height, (20, 20, 90, 100))
    mask[40:80, 40:70] = False  # hole
    mask[55:60, 50:55] = True  # island inside the hole
    mask[10:30, 140:190] = True  # second part
    return mask


SIZES = [(640, 480), (480, 640)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_brush_rle_decodes_to_exact_pixels(width: int, height: int) -> None:
    box = (37, 101, 400, 433)
    mask = box_mask(width, height, box)
    [region] = encode_instance(Instance("cat", 0.87654321, box, mask), control("brushlabels"), width, height)

    assert region["type"] == "brushlabels" and region["from_name"] == "brus" and region["to_name"] == "image"
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (
        width,
        height,
        0,
    )
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["cat"]
    assert region["score"] == 0.8765
    # What the Label Studio frontend does: decode to RGBA of the natural size, paint alpha > 0
    rgba = decode_rle(region["value"]["rle"]).reshape(height, width, 4)
    assert np.array_equal(rgba[:, :, 3] > 0, mask)
    assert np.array_equal(decode_region_mask(region), mask)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_bitmask_png_round_trip_on_non_square_images(width: int, height: int) -> None:
    mask = ring_and_blob(width, height)
    [region] = encode_instance(Instance("cat", 0.5, (0, 0, 1, 1), mask), control("bitmasklabels"), width, height)

    value = region["value"]
    BitmaskLabelsValue(**value)  # the SDK's schema for BitmaskLabels predictions
    assert value["imageDataURL"].startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(value["imageDataURL"].split(",", 1)[1])))
    assert png.size == (width, height) and png.mode == "RGBA"
    pixels = np.asarray(png)
    assert np.array_equal(pixels[:, :, 3] > 0, mask)  # the frontend tests alpha > 0
    assert not pixels[:, :, :3].any()  # black on transparent, like the tag's own export
    assert np.array_equal(decode_region_mask(region), mask)


def test_bitmask_decoding_accepts_gray_png_without_alpha() -> None:
    mask = box_mask(60, 40, (5, 6, 30, 20))
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    region = {
        "type": "bitmasklabels",
        "original_width": 60,
        "original_height": 40,
        "value": {"imageDataURL": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
    }
    assert np.array_equal(decode_region_mask(region), mask)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_polygon_points_lie_on_the_rectangle_edges(width: int, height: int) -> None:
    box = (37, 101, 400, 433)
    mask = box_mask(width, height, box)
    [region] = encode_instance(Instance("cat", 0.5, box, mask), control("polygonlabels"), width, height)

    value = region["value"]
    assert value["closed"] is True and value["polygonlabels"] == ["cat"]
    points = np.asarray(value["points"]) * (width / 100.0, height / 100.0)
    x0, y0, x1, y1 = box
    for x, y in points:
        on_vertical = min(abs(x - x0), abs(x - x1)) <= 1.0 and y0 - 1 <= y <= y1 + 1
        on_horizontal = min(abs(y - y0), abs(y - y1)) <= 1.0 and x0 - 1 <= x <= x1 + 1
        assert on_vertical or on_horizontal, (x, y)
    # the documented half-pixel convention makes a rectangle exact, corners included
    assert sorted(map(tuple, np.round(points, 6))) == sorted([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    assert np.array_equal(decode_region_mask(region), mask)


def test_polygons_one_region_per_part_and_min_area() -> None:
    width, height = 200, 120
    mask = ring_and_blob(width, height)
    mask[110, 5] = True  # a single pixel
    regions = encode_instance(Instance("cat", 0.5, (0, 0, 1, 1), mask), control("polygonlabels"), width, height)
    # ring, island inside its hole, blob, single pixel: four parts, each its own region
    assert len(regions) == 4
    assert len({r["id"] for r in regions}) == 4
    union = np.zeros_like(mask)
    for region in regions:
        union |= decode_region_mask(region)
    hole = np.zeros_like(mask)
    hole[40:80, 40:70] = True
    # polygons cannot carry holes: everything but the hole is reproduced exactly
    assert np.array_equal(union & ~hole, mask & ~hole)

    big_only = encode_instance(
        Instance("cat", 0.5, (0, 0, 1, 1), mask), control("polygonlabels"), width, height, min_area=30
    )
    assert len(big_only) == 2  # the island (25 px) and the pixel are dropped


def test_polygon_outline_stays_within_a_pixel_for_curved_shapes() -> None:
    import cv2

    mask = np.zeros((300, 400), dtype=np.uint8)
    cv2.circle(mask, (180, 150), 90, 1, -1)
    cv2.ellipse(mask, (330, 60), (40, 20), 30, 0, 360, 1, -1)
    mask = mask.astype(bool)
    polygons = mask_to_polygons(mask, tolerance=0.0)
    raster = np.zeros_like(mask)
    for points in polygons:
        raster |= decode_region_mask(
            {
                "type": "polygonlabels",
                "original_width": 400,
                "original_height": 300,
                "value": {"points": points},
            }
        )
    differing = raster ^ mask
    # every differing pixel is on the mask's boundary (one pixel from the other side)
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    shrunk = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert not (differing & ~(grown & ~shrunk)).any()
    assert differing.sum() < 0.02 * mask.sum()


def test_thin_lines_and_single_pixels_give_valid_polygons() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[3, 2:6] = True
    mask[7, 9] = True
    polygons = [np.asarray(p) * (12 / 100, 10 / 100) for p in mask_to_polygons(mask, tolerance=0.0)]
    assert len(polygons) == 2 and all(len(p) >= 3 for p in polygons)
    line, pixel = sorted(polygons, key=lambda p: p[:, 1].min())
    assert line[:, 0].min() >= 2 and line[:, 0].max() <= 6 and line[:, 1].min() == 3 and line[:, 1].max() == 4
    assert sorted(map(tuple, pixel)) == [(9, 7), (9, 8), (10, 7), (10, 8)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_rectangle_percentages_are_exact(width: int, height: int) -> None:
    box = (37.0, 101.0, 400.0, 433.0)
    [region] = encode_instance(Instance("cat", 0.5, box), control("rectanglelabels"), width, height)
    value = region["value"]
    assert value == {
        "x": 37 / width * 100,
        "y": 101 / height * 100,
        "width": 363 / width * 100,
        "height": 332 / height * 100,
        "rotation": 0,
        "rectanglelabels": ["cat"],
    }
    assert np.array_equal(decode_region_mask(region), box_mask(width, height, (37, 101, 400, 433)))


def test_rectangle_is_the_instance_box_not_the_mask_bounds() -> None:
    mask = ring_and_blob()  # pixel bounds (20, 10) .. (190, 100)
    [region] = encode_instance(Instance("cat", 0.5, (4, 6, 150, 90), mask), control("rectanglelabels"), 200, 120)
    value = region["value"]
    assert (value["x"], value["y"]) == (4 / 200 * 100, 6 / 120 * 100)
    assert (value["width"], value["height"]) == (146 / 200 * 100, 84 / 120 * 100)


def test_rectangle_box_is_clipped_and_empty_box_dropped() -> None:
    [region] = encode_instance(Instance("cat", 0.5, (-10, -5, 50, 500)), control("rectanglelabels"), 100, 80)
    assert (region["value"]["x"], region["value"]["y"]) == (0.0, 0.0)
    assert (region["value"]["width"], region["value"]["height"]) == (50.0, 100.0)
    assert encode_instance(Instance("cat", 0.5, (30, 30, 30, 60)), control("rectanglelabels"), 100, 80) == []


def test_rotated_rectangle_rasterises_about_its_top_left_corner() -> None:
    region = {
        "type": "rectanglelabels",
        "original_width": 100,
        "original_height": 100,
        "value": {"x": 50.0, "y": 20.0, "width": 30.0, "height": 10.0, "rotation": 90},
    }
    # clockwise on screen: the width runs down from (50, 20), the height to the left
    assert np.array_equal(decode_region_mask(region), box_mask(100, 100, (40, 20, 50, 50)))


@pytest.mark.parametrize("kind", ["brushlabels", "bitmasklabels", "polygonlabels", "rectanglelabels"])
def test_empty_mask_gives_no_region(kind: str) -> None:
    empty = np.zeros((48, 64), dtype=bool)
    assert encode_instance(Instance("cat", 0.9, (1, 1, 10, 10), empty), control(kind), 64, 48) == []


def test_mask_of_the_wrong_size_or_missing_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        encode_instance(Instance("cat", 0.9, (0, 0, 1, 1), np.ones((48, 64), bool)), control("brushlabels"), 48, 64)
    with pytest.raises(ValueError, match="needs a mask"):
        encode_instance(Instance("cat", 0.9, (0, 0, 1, 1)), control("polygonlabels"), 64, 48)


def test_region_ids_are_unique() -> None:
    mask = box_mask(64, 48, (2, 2, 20, 20))
    ids = {
        encode_instance(Instance("cat", 0.9, (2, 2, 20, 20), mask), control("brushlabels"), 64, 48)[0]["id"]
        for _ in range(200)
    }
    assert len(ids) == 200


def test_brush_rle_of_another_size_is_a_clear_error() -> None:
    [region] = encode_instance(
        Instance("cat", 0.5, (0, 0, 1, 1), box_mask(64, 48, (1, 1, 9, 9))), control("brushlabels"), 64, 48
    )
    wrong = {**region, "original_width": 48, "original_height": 64 + 1}
    with pytest.raises(ValueError, match=r"RLE holds 12288 values .* 48 x 65 x 4 = 12480"):
        decode_region_mask(wrong)
    with pytest.raises(ValueError, match="original_width"):
        decode_region_mask({k: v for k, v in region.items() if k != "original_height"})
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_region_mask({**region, "value": {**region["value"], "rle": region["value"]["rle"][:8]}})
    with pytest.raises(ValueError, match="no RLE"):
        decode_region_mask({**region, "value": {"format": "rle"}})


def test_unknown_region_type_is_refused() -> None:
    with pytest.raises(ValueError, match="keypointlabels"):
        decode_region_mask({"type": "keypointlabels", "original_width": 5, "original_height": 5, "value": {}})


def test_remove_small_regions_removes_islands_and_fills_holes() -> None:
    mask = box_mask(100, 80, (10, 10, 60, 60))
    mask[30:33, 30:33] = False  # 9-pixel hole
    mask[40:50, 40:50] = False  # 100-pixel hole (kept at min_area 20)
    mask[70:72, 80:82] = True  # 4-pixel island
    mask[0:10, 90:100] = True  # 100-pixel island (kept)
    mask[79, 0:3] = True  # 3-pixel island on the border
    cleaned = remove_small_regions(mask, 20)

    expected = box_mask(100, 80, (10, 10, 60, 60))
    expected[40:50, 40:50] = False
    expected[0:10, 90:100] = True
    assert np.array_equal(cleaned, expected)
    assert np.array_equal(remove_small_regions(mask, 0), mask)


def test_remove_small_regions_leaves_border_background_alone() -> None:
    # a small background notch open to the image edge is not a hole
    mask = box_mask(40, 30, (0, 0, 40, 30))
    mask[0:2, 10:12] = False
    assert np.array_equal(remove_small_regions(mask, 10), mask)


def test_holes_enclosed_by_diagonal_steps_are_holes() -> None:
    # a 1-pixel diamond outline: 8-connected, so its inside is enclosed (4-connected background)
    ys, xs = np.mgrid[0:20, 0:20]
    distance = np.abs(xs - 10) + np.abs(ys - 10)
    mask = distance == 6
    assert (distance < 6).sum() == 61 and (distance <= 6).sum() == 85
    assert np.array_equal(remove_small_regions(mask, 70), distance <= 6)
