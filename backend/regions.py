"""Masks and boxes <-> Label Studio result regions (brush RLE, bitmask PNG, polygons, rectangles).

Every coordinate Label Studio stores is a percentage of ``original_width`` / ``original_height``;
masks here are boolean ``(height, width)`` arrays of the original (EXIF-transposed) image, and
boxes are ``(x0, y0, x1, y1)`` pixels with ``x1`` / ``y1`` exclusive, so pixel ``i`` covers the
continuous interval ``[i, i + 1)``.

Formats, as the Label Studio frontend reads them:

* brush: Label Studio's own RLE (``label_studio_sdk.converter.brush``) of the mask as an RGBA
  image flattened row-major, 4 values per pixel. The frontend (``RLE2Region``) paints every
  pixel whose alpha is non-zero, so the mask is written as 255 in all four channels, which is
  what the SDK's ``mask2rle`` produces from a 0/255 mask (byte for byte, through the vectorised
  codec in :mod:`backend.brush_rle`: the SDK's own takes longer than the SAM decoder per mask).
* bitmask: a PNG data URL at full original size, black opaque pixels on a transparent
  background (what the ``BitmaskLabels`` tag itself exports; it tests ``alpha > 0``).
* polygon: Label Studio polygons have no holes, so each 8-connected part becomes one region
  (its outer boundary); holes are lost, which is why brush or bitmask is the lossless choice.

A bare tool with a separate ``<Labels>`` tag (``OutputControl.labels_name``) is stored the way
Label Studio's editor stores a region drawn with it (``Result.serialize`` in the editor): two
results sharing one ``id``, the tool's (``type`` ``"bitmask"``, value = the geometry) and then
the ``<Labels>``'s (``type`` ``"labels"``, value = the same geometry plus ``"labels"``). The editor
builds one region from all results with the same ``id``, from the first one;
label_studio_sdk's prediction validation (``LabelsTag.validate_value``) wants the geometry in the
labels result too. ``join_split_results`` folds such pairs back into one ``*labels`` region.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as coco_mask

from backend import brush_rle
from backend.labeling import SHAPE_TYPES, OutputControl

Box = tuple[float, float, float, float]

SCORE_DECIMALS = 4  # scores are model confidences; more digits are noise in the JSON
_PNG_DATA_URL_PREFIX = "data:image/png;base64,"


@dataclass
class Instance:
    """One found object, what the pipelines hand to ``encode_instance``.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels with exclusive ``x1`` / ``y1``; ``mask`` is a
    boolean ``(height, width)`` array of the original image, or None for box-only output.
    """

    label: str
    score: float
    box: Box
    mask: np.ndarray | None = None


def _region_id() -> str:
    """A short random id; Label Studio only needs ids unique within an annotation."""
    return uuid.uuid4().hex[:10]


def labelled_results(
    control: OutputControl,
    width: int,
    height: int,
    geometry: Mapping[str, Any],
    label: str,
    score: float | None = None,
) -> list[dict[str, Any]]:
    """The result items of one region: ``geometry`` (its value without labels) under ``label``.

    One ``*labels`` item for a ``*Labels`` control; for a bare tool, Label Studio's pair (tool
    result, then labels result, one ``id``; see the module doc). No ``score`` key when
    ``score`` is None (imported ground truth has none).
    """
    base: dict[str, Any] = {
        "id": _region_id(),
        "to_name": control.to_name,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
    }
    if score is not None:
        base["score"] = round(float(score), SCORE_DECIMALS)
    if control.labels_name is None:
        value = {**geometry, control.type: [label]}
        return [{**base, "from_name": control.name, "type": control.type, "value": value}]
    return [
        {**base, "from_name": control.name, "type": control.shape_type, "value": dict(geometry)},
        {**base, "from_name": control.labels_name, "type": "labels", "value": {**geometry, "labels": [label]}},
    ]


def encode_instance(
    instance: Instance,
    control: OutputControl,
    width: int,
    height: int,
    polygon_tolerance: float = 1.0,
    min_area: int = 0,
) -> list[dict[str, Any]]:
    """Label Studio regions for one instance in ``control``'s format.

    Brush, bitmask and rectangle give at most one region; polygons give one region per
    connected part whose pixel count is at least ``max(min_area, 1)``. A region is one result,
    or two for a bare tool with ``<Labels>`` (``labelled_results``). An instance with an
    empty mask (or an empty box) gives ``[]``, because Label Studio cannot show a region
    without pixels. ``polygon_tolerance`` is the Douglas-Peucker epsilon in pixels.
    """
    mask = instance.mask
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(
                f"mask for label {instance.label!r} has shape {mask.shape}, "
                f"but the image is {height}x{width} (height x width)"
            )
        if not mask.any():
            return []
    if control.type == "rectanglelabels":
        geometries = _rectangle_geometries(instance, width, height)
    elif mask is None:
        raise ValueError(f"a {control.type} output needs a mask; instance {instance.label!r} has none")
    elif control.type == "brushlabels":
        geometries = [{"format": "rle", "rle": encode_brush_rle(mask)}]
    elif control.type == "bitmasklabels":
        geometries = [{"imageDataURL": encode_bitmask_png(mask)}]
    elif control.type == "polygonlabels":
        geometries = [
            {"points": points, "closed": True} for points in mask_to_polygons(mask, polygon_tolerance, min_area)
        ]
    else:
        raise ValueError(f"cannot encode regions for control type {control.type!r}")
    return [
        result
        for geometry in geometries
        for result in labelled_results(control, width, height, geometry, instance.label, instance.score)
    ]


def _rectangle_geometries(instance: Instance, width: int, height: int) -> list[dict[str, Any]]:
    """The instance's box, clipped to the image, in percent; none when empty. On the grounded
    route that is the detector's box (the issue's "box -> rectangle"); clicks and the
    everything mode set the box to their mask's pixel bounds."""
    x0, y0, x1, y1 = (float(v) for v in instance.box)
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return []
    return [
        {
            "x": x0 / width * 100.0,
            "y": y0 / height * 100.0,
            "width": (x1 - x0) / width * 100.0,
            "height": (y1 - y0) / height * 100.0,
            "rotation": 0,
        }
    ]


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean mask (RGBA, 255 in every channel where set)."""
    return brush_rle.encode_mask(mask)


def encode_bitmask_png(mask: np.ndarray) -> str:
    """PNG data URL of a boolean mask: black opaque where set, transparent elsewhere."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)  # colour channels 0, so BGRA == RGBA
    rgba[..., 3] = np.where(mask, 255, 0)
    ok, png = cv2.imencode(".png", rgba)  # about 4x faster than Pillow at the same size
    if not ok:
        raise ValueError(f"OpenCV could not encode a {mask.shape} mask as PNG")
    return _PNG_DATA_URL_PREFIX + base64.b64encode(png.tobytes()).decode("ascii")


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: int = 0) -> list[list[list[float]]]:
    """One polygon (``[[x%, y%], ...]``) per 8-connected part of ``mask`` with enough pixels.

    Coordinates: OpenCV traces the *centres* of boundary pixels, i.e. a filled rectangle of
    pixels ``[x0, x1)`` yields contour x values ``x0 .. x1 - 1``. Each contour vertex is moved
    from its pixel centre (``i + 0.5``) half a pixel outwards along each axis in which the
    boundary's outward normal points there (``i + 0.5 + 0.5 * sign(n)``), so it lands on the
    pixel's outer corner or edge midpoint. A filled rectangle therefore maps exactly to
    ``x0`` / ``x1`` / ``y0`` / ``y1``, and any outline is within half a pixel of the true pixel
    boundary before Douglas-Peucker simplification (``tolerance`` pixels) is applied.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    threshold = max(int(min_area), 1)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    polygons: list[list[list[float]]] = []
    for index in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[index])
        if area < threshold:
            continue
        # a 1-pixel zero border keeps the part's contour off the crop's edge
        part = np.zeros((h + 2, w + 2), dtype=np.uint8)
        part[1:-1, 1:-1] = labels[y : y + h, x : x + w] == index
        contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=len)[:, 0, :].astype(np.float64) + (x - 1, y - 1)
        outline = _simplify(_outer_edge_points(contour), tolerance)
        if outline is None:  # one pixel or two: the bounding box (exact unless they touch diagonally)
            outline = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)
        points = np.clip(outline / (width, height) * 100.0, 0.0, 100.0)
        polygons.append(points.tolist())
    return polygons


def _outer_edge_points(contour: np.ndarray) -> np.ndarray:
    """Move pixel-centre contour vertices half a pixel outwards (see ``mask_to_polygons``)."""
    incoming = contour - np.roll(contour, 1, axis=0)
    outgoing = np.roll(contour, -1, axis=0) - contour
    # For OpenCV's outer borders (negative oriented area in image coordinates) the outward
    # normal of an edge (dx, dy) is (-dy, dx); a zero-area contour (a 1-pixel-wide line,
    # traced forth and back) follows the same convention, which is what gives it thickness.
    orientation = -1.0 if len(contour) >= 3 and cv2.contourArea(contour.astype(np.float32), True) > 0 else 1.0
    normal = orientation * np.stack([-(incoming[:, 1] + outgoing[:, 1]), incoming[:, 0] + outgoing[:, 0]], axis=1)
    return contour + 0.5 + 0.5 * np.sign(normal)


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray | None:
    """Douglas-Peucker in pixels; the unsimplified outline when simplifying leaves < 3 points,
    and None when even that is degenerate."""
    distinct = np.unique(points, axis=0)
    if len(distinct) < 3:
        return None
    simplified = cv2.approxPolyDP(points.astype(np.float32), max(float(tolerance), 0.0), True)[:, 0, :]
    return simplified.astype(np.float64) if len(simplified) >= 3 else points


# ---------------------------------------------------------------------------- decoding


def _result_kind(result: Any) -> str:
    return str(result.get("type", "")).lower() if isinstance(result, Mapping) else ""


def join_split_results(results: Iterable[Any]) -> list[Any]:
    """``results`` with every Label Studio split pair folded into the ``*labels`` region it is.

    A tool result (``brush``, ``bitmask``, ``polygon``, ``rectangle``) becomes ``<tool>labels``
    carrying the labels of the ``labels`` results that share its ``id`` (none: an empty list,
    an unlabelled region), and those ``labels`` results are dropped; everything else passes
    unchanged, in order. Readers (exports, coverage, refinement) then handle both config styles
    through one path, and the tool's own geometry is the one read.
    """
    results = list(results)
    tool_ids = {r.get("id") for r in results if _result_kind(r) in SHAPE_TYPES and r.get("id") is not None}
    labels_of: dict[Any, list[Any]] = {}
    for result in results:
        if _result_kind(result) == "labels" and result.get("id") in tool_ids:
            value = result.get("value")
            labels = value.get("labels") if isinstance(value, Mapping) else None
            strings = [label for label in labels if isinstance(label, str)] if isinstance(labels, list) else []
            labels_of.setdefault(result["id"], []).extend(strings)
    joined: list[Any] = []
    for result in results:
        kind = _result_kind(result)
        if kind in SHAPE_TYPES:
            value = result.get("value")
            labels = list(dict.fromkeys(labels_of.get(result.get("id"), [])))
            geometry = dict(value) if isinstance(value, Mapping) else {}
            joined.append({**result, "type": f"{kind}labels", "value": {**geometry, f"{kind}labels": labels}})
        elif not (kind == "labels" and result.get("id") in tool_ids):
            joined.append(result)
    return joined


def _original_size(result: dict[str, Any]) -> tuple[int, int]:
    width, height = result.get("original_width"), result.get("original_height")
    valid = all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 1 for v in (width, height))
    if not valid or int(width) != width or int(height) != height:
        raise ValueError(
            f"region {result.get('id')!r} needs positive integer original_width / original_height "
            f"to be rasterised, got {width!r} x {height!r}"
        )
    return int(width), int(height)


def decode_region_mask(result: dict[str, Any]) -> np.ndarray:
    """Boolean ``(original_height, original_width)`` mask of a brush, bitmask, polygon or
    rectangle region, for COCO export and as a previous mask for refinement.

    Raises ``ValueError`` naming the problem (missing sizes, RLE of the wrong length, a bad
    data URL, an unsupported region type).
    """
    width, height = _original_size(result)
    kind = str(result.get("type", "")).lower()
    value = result.get("value") or {}
    if not isinstance(value, Mapping):  # regions come from clients: check the shape, not trust it
        raise ValueError(f"region {result.get('id')!r} has no value object")
    if kind in {"brushlabels", "brush"}:
        return decode_brush_rle(value.get("rle"), width, height)
    if kind in {"bitmasklabels", "bitmask"}:
        return decode_bitmask_png(value.get("imageDataURL"), width, height)
    if kind in {"polygonlabels", "polygon"}:
        try:
            points = np.asarray(value.get("points") or [], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"polygon region {result.get('id')!r}: points are not [x, y] numbers") from exc
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise ValueError(f"polygon region {result.get('id')!r} needs at least 3 [x, y] points")
        return _fill_polygon(points * (width / 100.0, height / 100.0), width, height)
    if kind in {"rectanglelabels", "rectangle"}:
        try:
            x, y = value["x"] * width / 100.0, value["y"] * height / 100.0
            w, h = value["width"] * width / 100.0, value["height"] * height / 100.0
            angle = math.radians(float(value.get("rotation") or 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"rectangle region {result.get('id')!r} lacks numeric x/y/width/height/rotation") from exc
        # Label Studio rotates a rectangle clockwise (y points down) about its top-left corner
        cos, sin = math.cos(angle), math.sin(angle)
        corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
        rotated = corners @ np.array([[cos, sin], [-sin, cos]]) + (x, y)
        return _fill_polygon(rotated, width, height)
    raise ValueError(f"cannot rasterise a region of type {result.get('type')!r}")


MAX_VERTEX_SPAN = 4  # Label Studio's percentages stay near 0..100; 400 % is far beyond any real region


def _fill_polygon(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (vertices in continuous pixel coordinates).

    pycocotools samples pixel centres, so a rectangle with corners on pixel edges fills exactly
    ``[x0, x1) x [y0, y1)`` and the result matches what COCO evaluation rasterises
    (``cv2.fillPoly`` rounds vertices and fills both boundaries, one pixel too many).

    pycocotools casts vertices to C ints and walks every edge pixel by pixel, so a vertex far
    outside the image (client data such as ``x: 1e308``) overflows and kills the process:
    vertices must be finite and within ``MAX_VERTEX_SPAN`` image sizes of the origin.
    """
    limit = MAX_VERTEX_SPAN * max(width, height)
    if not np.isfinite(pixels).all() or np.abs(pixels).max(initial=0.0) > limit:
        raise ValueError(f"polygon vertices must be finite and within {MAX_VERTEX_SPAN} image sizes of the image")
    rles = coco_mask.frPyObjects([pixels.ravel().tolist()], height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def brush_rle_bytes(rle: Any, width: int, height: int) -> bytes:
    """A region's ``value.rle`` as bytes, checked to be an RGBA image of ``width`` x ``height``
    (what both a full decode and a single-pixel read need before trusting it)."""
    if not isinstance(rle, list | tuple | bytes) or len(rle) < 4:
        raise ValueError("brush region has no RLE data (value.rle)")
    try:
        data = bytes(rle)
    except (TypeError, ValueError) as exc:
        raise ValueError("brush RLE must be a list of byte values 0..255") from exc
    expected = width * height * 4
    declared = int.from_bytes(data[:4], "big")  # the format's 32-bit value count
    if declared != expected:
        raise ValueError(
            f"brush RLE holds {declared} values but original_width x original_height x 4 = "
            f"{width} x {height} x 4 = {expected}; the region does not belong to an image of this size"
        )
    return data


def decode_brush_rle(rle: Any, width: int, height: int) -> np.ndarray:
    """Mask from Label Studio brush RLE (alpha channel non-zero), checked against the size."""
    data = brush_rle_bytes(rle, width, height)
    try:
        flat = brush_rle.decode(data)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"brush RLE is truncated or corrupt: {exc}") from exc
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def decode_bitmask_png(data_url: Any, width: int, height: int) -> np.ndarray:
    """Mask from a bitmask PNG data URL: alpha > 0 when the PNG has transparency, else gray > 0."""
    if not isinstance(data_url, str) or not data_url.startswith("data:image/") or "," not in data_url:
        raise ValueError("bitmask region has no image data URL (value.imageDataURL)")
    header, payload = data_url.split(",", 1)
    if not header.endswith(";base64"):
        raise ValueError("bitmask data URL is not base64-encoded")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        if image.size != (width, height):  # checked from the header, before decoding a possible bomb
            raise ValueError(
                f"bitmask image is {image.size[0]}x{image.size[1]} but the region's original size is "
                f"{width}x{height}"
            )
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"bitmask data URL does not hold a readable image: {exc}") from exc
    if image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))[:, :, 3] > 0
    return np.asarray(image.convert("L")) > 0


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and drop islands smaller than ``min_area`` pixels (both ways).

    A hole is a background component that does not touch the image border (a background
    strip along the edge is not enclosed by the object). Foreground is 8-connected and
    background 4-connected, the dual pair under which outlines and holes agree: two background
    pixels touching only at a corner are separated by the foreground diagonal between them.
    Holes are filled first, so an island inside a small hole goes with the hole.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 0 or not mask.size:
        return mask.copy()
    background = ~mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(background.astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = stats[:, cv2.CC_STAT_AREA] < min_area
    small[0] = False  # label 0 is the foreground here
    small[border] = False
    filled = mask | small[labels]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels]
