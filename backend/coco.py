"""Label Studio JSON <-> COCO instances, and COCO evaluation of stored predictions.

Why this exists: Label Studio's own ``BRUSH_TO_COCO`` converter traces brush masks with
OpenCV's outer contours, so holes are filled, 1-2 pixel parts are dropped and every outline
is approximated; its ``COCO`` export drops brush regions altogether, and neither exports
predictions with scores. Here brush and bitmask masks become compressed COCO RLE computed by
pycocotools from the decoded mask, so ``pycocotools.mask.decode`` gives back the annotator's
pixels exactly.

Conventions (the README's export section points here):

* Input is Label Studio's JSON export: a list of tasks, each with ``data``, ``annotations``
  and ``predictions`` (``backend.ls_client`` returns live projects in the same shape).
* Categories come from the label config's output labels (``backend.labeling``), in config
  order, ids 1..N, so ids are stable across exports of one project. Without a config (JSON
  exports do not carry it) they are every label seen in annotations and predictions, sorted,
  so two exports of the same data still agree.
* ``image.id`` is the Label Studio task id, so annotations, predictions and later exports of
  one project join on it. ``file_name`` is the original upload name: the 8-hex prefix Label
  Studio adds to ``/data/upload/`` files is removed (kept where removing it would give two
  images one name), URLs and ``/data/local-files/?d=`` paths give their basename;
  ``keep_paths`` keeps the task's image reference verbatim. ``width`` / ``height`` come from
  the regions' ``original_width`` / ``original_height`` (or, for a task without regions, the
  task ``meta`` written by ``coco_to_ls``).
* One COCO annotation per Label Studio region and label ("one annotation per connected object
  region as Label Studio stores it": a brush region with three blobs is one annotation).
* Segmentation: brush / bitmask -> compressed RLE, exact (``segmentation="polygon"``: one
  outer ring per 8-connected part from ``backend.regions.mask_to_polygons``, holes filled,
  lossy); polygons -> the annotator's vertices; rectangles -> their four corners (rotation
  applied: top-left corner first, then clockwise on screen). Vertex coordinates are pixels
  rounded to 1e-4 (``COORD_DECIMALS``).
* ``area`` and ``bbox`` are the pixel count and pycocotools' ``toBbox`` of one mask, the
  pycocotools rasterisation of the segmentation, so they always agree and stay inside the
  image (a rotated rectangle reaching past the edge gets the box of its visible part); the
  exact, sub-pixel vertices are in the segmentation.
* Which annotation per task: ``latest`` (newest ``updated_at``/``created_at``, then highest
  id), ``all``, or ``ground-truth`` (the task's ground-truth annotation; tasks without one
  are left out). Cancelled (skipped) annotations never count. A task is an image of the
  dataset when it has a selected annotation, even an empty one (an image without objects).
* Predictions become a COCO *results* list (always RLE, as COCOeval's ``loadRes`` expects);
  the score is the region's ``score``, else the prediction's, else 1.0.

Import (``coco_to_ls``) keeps each object exactly where the label config has a control for its
shape: a mask becomes the pycocotools rasterisation of its RLE or polygons, a polygon keeps its
vertices, and a rectangle's ring gives back x / y / width / height / rotation
(``_rectangle_value``); a mask that only a polygon control can take is traced (lossy).

Round trip: ``ls_to_coco`` -> ``coco_to_ls(..., as_annotations=True)`` -> ``ls_to_coco`` gives
the identical dataset with RLE output (the default), for every region type. With
``segmentation="polygon"`` polygons and rectangles come back identical too, but brush and
bitmask regions do not: their rings are traced again from the imported mask (the rasterised
rings), and tracing a rasterised, simplified outline does not give that outline back (holes
filled, a new Douglas-Peucker pass on a different staircase). Repeating the round trip need
not settle either, so polygon output is for training, not for archiving Label Studio masks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import mimetypes
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.labeling import OUTPUT_TYPES, OutputControl, ProjectConfig
from backend.regions import (
    MAX_VERTEX_SPAN,
    Instance,
    decode_region_mask,
    encode_instance,
    join_split_results,
    labelled_results,
    mask_to_polygons,
)

log = logging.getLogger(__name__)

SEGMENTATION_MODES = ("rle", "polygon")
ANNOTATION_CHOICES = ("latest", "all", "ground-truth")
COORD_DECIMALS = 4  # pixel coordinates of vertices; survives the percent round trip exactly
_COORD_HALF_STEP = 0.5 * 10.0**-COORD_DECIMALS  # how far rounding may have moved a coordinate
DEFAULT_MODEL_VERSION = "coco-import"
_MASK_TYPES = ("brushlabels", "bitmasklabels")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(?=.)")

Task = Mapping[str, Any]


class CocoError(ValueError):
    """Input that cannot be converted; the message names the task (or image) and the problem."""


@dataclass(frozen=True)
class _Geometry:
    segmentation: list[list[float]] | dict[str, Any]
    area: int
    bbox: list[float]


# --------------------------------------------------------------------------- files


def load_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file, with an error that names the file instead of a bare traceback."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise CocoError(f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise CocoError(f"{os.fspath(path)!r} is not valid JSON: {exc}") from exc


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place, so a
    reader (or a crash) never sees half a file and a failed run leaves the old file intact."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """``write_text_atomic`` of compact JSON (COCO files of RLE masks get large)."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def as_tasks(obj: Any, source: str = "input") -> list[dict[str, Any]]:
    """Check that ``obj`` looks like a Label Studio JSON export (a list of task dicts)."""
    if isinstance(obj, dict) and "images" in obj:
        raise CocoError(f"{source} is a COCO dataset, not a Label Studio JSON export")
    if not isinstance(obj, list) or not all(isinstance(t, dict) for t in obj):
        raise CocoError(f"{source} is not a Label Studio JSON export (expected a list of tasks)")
    if not obj:
        raise CocoError(f"{source} holds no tasks: the project is empty")
    return obj


# --------------------------------------------------------------------------- tasks


def _task_id(task: Task, index: int) -> int:
    tid = task.get("id")
    if isinstance(tid, bool) or not isinstance(tid, int):
        raise CocoError(f"task #{index + 1} of the input has no integer 'id'; use a Label Studio JSON export")
    return tid


def _recency(annotation: Mapping[str, Any], position: int) -> tuple[str, int, int]:
    aid = annotation.get("id")
    return (
        str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        aid if isinstance(aid, int) and not isinstance(aid, bool) else -1,
        position,
    )


def select_annotations(task: Task, choice: str = "latest") -> list[Mapping[str, Any]]:
    """The task's annotations that go into the dataset (see the module doc)."""
    if choice not in ANNOTATION_CHOICES:
        raise ValueError(f"annotations must be one of {ANNOTATION_CHOICES}, got {choice!r}")
    usable = [
        (pos, ann)
        for pos, ann in enumerate(task.get("annotations") or [])
        if isinstance(ann, Mapping) and not ann.get("was_cancelled")
    ]
    if choice == "ground-truth":
        usable = [(pos, ann) for pos, ann in usable if ann.get("ground_truth")]
    if choice == "all" or not usable:
        return [ann for _, ann in usable]
    return [max(usable, key=lambda item: _recency(item[1], item[0]))[1]]


def _image_reference(task: Task, tid: int, config: ProjectConfig | None) -> str:
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise CocoError(f"task {tid} has no 'data' object")
    if config is not None:
        key = config.image_value_key
    elif "image" in data or len(data) != 1:
        key = "image"
    else:
        key = next(iter(data))
    value = data.get(key)
    if not isinstance(value, str) or not value:
        hint = "" if config is not None else " (pass the label config so its <Image value> names the key)"
        raise CocoError(f"task {tid} has no image reference in data[{key!r}]{hint}")
    return value


def file_name_candidates(reference: str, tid: int) -> tuple[str, str]:
    """(preferred, fallback) COCO ``file_name`` of a task's image reference.

    Preferred strips Label Studio's 8-hex upload prefix; fallback keeps it (unique per upload).
    """
    if reference.startswith("data:"):
        mime = reference[5:].split(";", 1)[0].split(",", 1)[0]
        name = f"task-{tid}{mimetypes.guess_extension(mime) or ''}"
        return name, name
    parsed = urlparse(reference)
    local = parse_qs(parsed.query).get("d")
    path = local[0] if local else unquote(parsed.path)
    base = path.rstrip("/").rsplit("/", 1)[-1] or f"task-{tid}"
    if "/data/upload/" in f"/{path.lstrip('/')}" and not local:
        return _UPLOAD_PREFIX.sub("", base), base
    return base, base


def _file_names(references: Sequence[tuple[int, str]], keep_paths: bool) -> list[str]:
    """File names for (task id, reference) pairs; stripped upload names that would collide
    keep their (unique) Label Studio prefix instead."""
    if keep_paths:
        return [ref for _, ref in references]
    pairs = [file_name_candidates(ref, tid) for tid, ref in references]
    counts = Counter(preferred for preferred, _ in pairs)
    return [preferred if counts[preferred] == 1 else fallback for preferred, fallback in pairs]


def _region_labels(result: Mapping[str, Any]) -> list[str]:
    value = result.get("value") or {}
    labels = value.get(result.get("type"))
    return [str(label) for label in labels] if isinstance(labels, list) else []


def _output_regions(results: Iterable[Any], tid: int, config: ProjectConfig | None) -> list[Mapping[str, Any]]:
    """Regions this converter handles: brush, bitmask, polygon and rectangle labels on the
    config's image (a bare tool's result and its ``<Labels>`` result count as one region);
    other results (choices, text, keypoints, relations) are not objects."""
    regions = []
    for result in join_split_results(results):
        if not isinstance(result, Mapping) or result.get("type") not in OUTPUT_TYPES:
            continue
        if config is not None and result.get("to_name") not in (None, config.image_name):
            continue
        if not _region_labels(result):
            log.warning("task %s: region %r has no label; left out", tid, result.get("id"))
            continue
        regions.append(result)
    return regions


def _sizes(results: Iterable[Any]) -> set[tuple[Any, Any]]:
    return {
        (r.get("original_width"), r.get("original_height"))
        for r in results
        if isinstance(r, Mapping) and (r.get("original_width") is not None or r.get("original_height") is not None)
    }


def _image_size(task: Task, tid: int, regions: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """The image size from the exported regions; for an empty annotation, from any other
    result of the task, then from ``meta`` (written by ``coco_to_ls``)."""
    sizes = _sizes(regions)
    if not sizes:
        items = [*(task.get("annotations") or []), *(task.get("predictions") or [])]
        sizes = _sizes(r for item in items if isinstance(item, Mapping) for r in item.get("result") or [])
    meta = task.get("meta") or {}
    if not sizes and "original_width" in meta:
        sizes = {(meta.get("original_width"), meta.get("original_height"))}
    if not sizes:
        raise CocoError(
            f"task {tid}: no region carries original_width/original_height, so the image size "
            "is unknown; export the task with at least one region or add meta.original_width/height"
        )
    if len(sizes) > 1:
        raise CocoError(f"task {tid}: regions disagree on the image size: {sorted(sizes, key=str)}")
    width, height = next(iter(sizes))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise CocoError(f"task {tid}: image size {width!r} x {height!r} is not two positive integers")
    return width, height


def categories(tasks: Sequence[Task], config: ProjectConfig | None = None) -> list[dict[str, Any]]:
    """COCO categories: config labels in config order, else every label seen, sorted."""
    if config is not None:
        names: Sequence[str] = config.export_label_values()
    else:
        seen: set[str] = set()
        for task in tasks:
            for item in [*(task.get("annotations") or []), *(task.get("predictions") or [])]:
                for result in join_split_results(item.get("result") or []) if isinstance(item, Mapping) else []:
                    if isinstance(result, Mapping) and result.get("type") in OUTPUT_TYPES:
                        seen.update(_region_labels(result))
        names = sorted(seen)
    return [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(names, start=1)]


# --------------------------------------------------------------------------- geometry


def _rle_geometry(mask: np.ndarray) -> _Geometry:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"].decode("ascii")
    return _Geometry(
        segmentation={"size": [int(v) for v in rle["size"]], "counts": counts},
        area=int(coco_mask.area(rle)),
        bbox=[float(v) for v in coco_mask.toBbox(rle)],
    )


def _rounded(values: Iterable[float]) -> list[float]:
    return [round(float(v), COORD_DECIMALS) + 0.0 for v in values]  # + 0.0: no "-0.0" in JSON


def _polygon_geometry(rings: list[list[float]], width: int, height: int) -> _Geometry:
    """The rings as they are, with ``area`` and ``bbox`` of pycocotools' rasterisation, so both
    describe the same pixels (a region reaching outside the image gets a box clipped to it)."""
    merged = coco_mask.merge(coco_mask.frPyObjects(rings, height, width))
    return _Geometry(
        segmentation=rings,
        area=int(coco_mask.area(merged)),
        bbox=[float(v) for v in coco_mask.toBbox(merged)],
    )


def _percent_ring(points: Iterable[Sequence[float]], width: int, height: int) -> list[float]:
    return _rounded(v for x, y in points for v in (x * width / 100.0, y * height / 100.0))


def _rectangle_ring(value: Mapping[str, Any], width: int, height: int) -> list[float]:
    """Corners of a Label Studio rectangle in pixels: top-left corner, then clockwise on screen.

    Label Studio rotates clockwise (y down) about the top-left corner. The corner and the two
    edge vectors are rounded (not the four corners independently), so the ring is an exact
    parallelogram at ``COORD_DECIMALS`` and ``_rectangle_value`` can find a rectangle that
    gives this very ring again.
    """
    x, y = value["x"] * width / 100.0, value["y"] * height / 100.0
    w, h = value["width"] * width / 100.0, value["height"] * height / 100.0
    angle = math.radians(float(value.get("rotation") or 0.0))
    cos, sin = math.cos(angle), math.sin(angle)
    origin = np.array(_rounded((x, y)))
    along, across = np.array(_rounded((w * cos, w * sin))), np.array(_rounded((-h * sin, h * cos)))
    return _rounded(np.concatenate([origin, origin + along, origin + along + across, origin + across]))


def _simplest(lo: float, hi: float) -> float:
    """The number with the fewest decimals in the middle half of ``[lo, hi]``: a rotation of 30
    degrees comes back as 30.0, not 29.99999871, and the margin keeps it clear of the ends."""
    quarter = (float(hi) - float(lo)) / 4.0
    lo, hi = float(lo) + quarter, float(hi) - quarter
    middle = (lo + hi) / 2.0
    for digits in range(13):
        candidate = round(middle, digits)
        if lo <= candidate <= hi:
            return candidate + 0.0
    return middle


def _direction_range(vector: np.ndarray) -> tuple[float, float, float]:
    """Direction of ``vector`` (radians) and the offsets to the smallest and largest direction
    of any vector that rounds to it (its rounding cell, which does not contain the origin)."""
    cell = vector + _COORD_HALF_STEP * np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    offsets = np.arctan2(vector[0] * cell[:, 1] - vector[1] * cell[:, 0], cell @ vector)
    return math.atan2(vector[1], vector[0]), float(offsets.min()), float(offsets.max())


def _length_range(target: np.ndarray, direction: np.ndarray) -> tuple[float, float]:
    """Lengths ``t`` for which ``t * direction`` rounds to ``target`` (one interval per axis)."""
    lo, hi = 0.0, math.inf
    for component, step in zip(target, direction, strict=True):
        if step:
            ends = sorted(((component - _COORD_HALF_STEP) / step, (component + _COORD_HALF_STEP) / step))
            lo, hi = max(lo, ends[0]), min(hi, ends[1])
    return lo, hi


def _rectangle_value(ring: Sequence[float], width: int, height: int) -> dict[str, float] | None:
    """The Label Studio rectangle (``x``, ``y``, ``width``, ``height`` in percent, ``rotation``
    in degrees) whose ``_rectangle_ring`` is ``ring``; None when the ring is not a rectangle.

    The top-left corner is the ring's first vertex. The rounded edge vectors only bound the
    rotation to an interval per edge; a rotation in both intervals (the true one is) with
    lengths inside the edges' rounding cells reproduces every rounded corner exactly, which a
    rotation taken from one edge alone does not (about half of random rotated rectangles).
    A ring traversed the other way round is read from its first vertex backwards.
    """
    corners = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(corners) != 4:
        return None
    along, across = np.array(_rounded(corners[1] - corners[0])), np.array(_rounded(corners[3] - corners[0]))
    if along[0] * across[1] - along[1] * across[0] < 0:
        along, across = across, along
    if _rounded(corners[0] + along + across) != _rounded(corners[2]):
        return None  # not a parallelogram
    if min(np.abs(along).max(), np.abs(across).max()) <= _COORD_HALF_STEP:
        return None  # an edge of zero length: no direction to take the rotation from
    angle, lo, hi = _direction_range(along)
    across_angle, across_lo, across_hi = _direction_range(across)
    shift = (across_angle - math.pi / 2.0 - angle + math.pi) % (2.0 * math.pi) - math.pi
    lo, hi = max(lo, shift + across_lo), min(hi, shift + across_hi)
    if lo > hi:
        return None  # the edges are not perpendicular
    rotation = _simplest(math.degrees(angle + lo), math.degrees(angle + hi)) % 360.0
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    w = _simplest(*_length_range(along, np.array([cos, sin])))
    h = _simplest(*_length_range(across, np.array([-sin, cos])))
    return {
        "x": float(corners[0, 0]) * 100.0 / width,
        "y": float(corners[0, 1]) * 100.0 / height,
        "width": w * 100.0 / width,
        "height": h * 100.0 / height,
        "rotation": rotation,
    }


def _region_mask(result: Mapping[str, Any], where: str) -> np.ndarray:
    try:
        return decode_region_mask(dict(result))
    except ValueError as exc:
        raise CocoError(f"{where}: {exc}") from exc


def _geometry(
    result: Mapping[str, Any], width: int, height: int, mode: str, tolerance: float, where: str
) -> _Geometry | None:
    kind = result["type"]
    value = result.get("value") or {}
    if kind in _MASK_TYPES:
        mask = _region_mask(result, where)
        if not mask.any():
            log.warning("%s: the mask is empty; left out", where)
            return None
        if mode == "rle":
            return _rle_geometry(mask)
        rings = [_percent_ring(points, width, height) for points in mask_to_polygons(mask, tolerance)]
        return _polygon_geometry(rings, width, height)
    try:
        if kind == "polygonlabels":
            points = value["points"]
            if len(points) < 3:
                raise CocoError(f"{where}: a polygon needs at least 3 points, it has {len(points)}")
            ring = _percent_ring(points, width, height)
        else:
            ring = _rectangle_ring(value, width, height)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CocoError):
            raise
        raise CocoError(f"{where}: malformed {kind} value ({exc!r})") from exc
    return _polygon_geometry(_checked_vertices([ring], width, height, where), width, height)


def _region_where(tid: int, result: Mapping[str, Any], source: str) -> str:
    return f"task {tid}, {source}, region {result.get('id')!r}"


def _category_ids(cats: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {str(c["name"]): int(c["id"]) for c in cats}


def _category_of(label: str, ids: Mapping[str, int], where: str) -> int:
    if label not in ids:
        raise CocoError(f"{where}: label {label!r} is not in the label config ({', '.join(ids) or 'no labels'})")
    return ids[label]


# --------------------------------------------------------------------------- export


def ls_to_coco(
    tasks: Sequence[Task],
    config: ProjectConfig | None = None,
    *,
    segmentation: str = "rle",
    annotations: str = "latest",
    keep_paths: bool = False,
    polygon_tolerance: float = 1.0,
) -> dict[str, Any]:
    """COCO instances dataset from a Label Studio JSON export (see the module doc)."""
    if segmentation not in SEGMENTATION_MODES:
        raise ValueError(f"segmentation must be one of {SEGMENTATION_MODES}, got {segmentation!r}")
    if not tasks:
        raise CocoError("the input holds no tasks: the project is empty")
    cats = categories(tasks, config)
    cat_ids = _category_ids(cats)
    chosen: list[tuple[Task, int, list[Mapping[str, Any]]]] = []
    for index, task in enumerate(tasks):
        tid = _task_id(task, index)
        selected = select_annotations(task, annotations)
        if selected:
            chosen.append((task, tid, selected))
    if not chosen:
        raise CocoError(
            f"none of the {len(tasks)} tasks has a usable annotation for --annotations {annotations} "
            "(cancelled annotations are skipped)"
        )
    references = [(tid, _image_reference(task, tid, config)) for task, tid, _ in chosen]
    names = _file_names(references, keep_paths)
    images: list[dict[str, Any]] = []
    coco_annotations: list[dict[str, Any]] = []
    for (task, tid, selected), file_name in zip(chosen, names, strict=True):
        per_annotation = [(ann, _output_regions(ann.get("result") or [], tid, config)) for ann in selected]
        width, height = _image_size(task, tid, [r for _, regions in per_annotation for r in regions])
        images.append({"id": tid, "file_name": file_name, "width": width, "height": height})
        for ann, regions in per_annotation:
            source = f"annotation {ann.get('id')!r}"
            for result in regions:
                where = _region_where(tid, result, source)
                label_ids = [_category_of(label, cat_ids, where) for label in _region_labels(result)]
                geometry = _geometry(result, width, height, segmentation, polygon_tolerance, where)
                if geometry is None:
                    continue
                for category_id in label_ids:
                    coco_annotations.append(
                        {
                            "id": len(coco_annotations) + 1,
                            "image_id": tid,
                            "category_id": category_id,
                            "segmentation": geometry.segmentation,
                            "area": geometry.area,
                            "bbox": geometry.bbox,
                            "iscrowd": 0,
                        }
                    )
    return {
        "info": {"description": "Label Studio export (grounded-sam-backend)", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": coco_annotations,
        "categories": cats,
    }


def _predictions_of(task: Task, model_version: str | None) -> list[Mapping[str, Any]]:
    preds = [
        (pos, p)
        for pos, p in enumerate(task.get("predictions") or [])
        if isinstance(p, Mapping) and (model_version is None or p.get("model_version") == model_version)
    ]
    latest: dict[Any, tuple[int, Mapping[str, Any]]] = {}
    for pos, pred in preds:  # one prediction per model version: the newest
        key = pred.get("model_version")
        if key not in latest or _recency(pred, pos) >= _recency(latest[key][1], latest[key][0]):
            latest[key] = (pos, pred)
    return [pred for _, pred in sorted(latest.values(), key=lambda item: item[0])]


def ls_to_coco_results(
    tasks: Sequence[Task],
    config: ProjectConfig | None = None,
    *,
    model_version: str | None = None,
) -> list[dict[str, Any]]:
    """COCO results (``image_id``, ``category_id``, RLE ``segmentation``, ``bbox``, ``score``)
    from the tasks' stored predictions; ids and categories agree with ``ls_to_coco``.

    With several model versions in the input, ``model_version`` must pick one: a results file
    mixing models would be evaluated as one model.
    """
    if not tasks:
        raise CocoError("the input holds no tasks: the project is empty")
    if any(not isinstance(p, Mapping) for t in tasks for p in t.get("predictions") or []):
        raise CocoError(
            "the input lists predictions by id only (Label Studio's JSON export does so): read them "
            "from the live project instead (--project with --ls-url and --api-key)"
        )
    versions = sorted(
        {str(p.get("model_version")) for t in tasks for p in t.get("predictions") or [] if isinstance(p, Mapping)}
    )
    if model_version is None and len(versions) > 1:
        raise CocoError(f"the predictions come from several model versions {versions}; choose one with --model-version")
    cat_ids = _category_ids(categories(tasks, config))
    results: list[dict[str, Any]] = []
    found = False
    for index, task in enumerate(tasks):
        tid = _task_id(task, index)
        for pred in _predictions_of(task, model_version):
            found = True
            regions = _output_regions(pred.get("result") or [], tid, config)
            source = f"prediction {pred.get('id')!r}"
            for result in regions:
                where = _region_where(tid, result, source)
                label_ids = [_category_of(label, cat_ids, where) for label in _region_labels(result)]
                mask = _region_mask(result, where)
                if not mask.any():
                    continue
                geometry = _rle_geometry(mask)
                score = result.get("score", pred.get("score"))
                for category_id in label_ids:
                    results.append(
                        {
                            "image_id": tid,
                            "category_id": category_id,
                            "segmentation": geometry.segmentation,
                            "bbox": geometry.bbox,
                            "score": 1.0 if score is None else float(score),
                        }
                    )
    if not found:
        wanted = f" of model version {model_version!r}" if model_version else ""
        raise CocoError(f"no task holds predictions{wanted} (versions present: {versions or 'none'})")
    return results


# --------------------------------------------------------------------------- import


def _checked_rle(segmentation: Mapping[str, Any], width: int, height: int, where: str) -> dict[str, Any]:
    """A COCO RLE (compressed, or uncompressed ``counts`` list) as pycocotools' compressed RLE,
    after checking that it covers the image: pycocotools itself would decode a mask of the
    wrong size, or compare it with the image's other masks as if nothing overlapped (AP 0)."""
    size = segmentation.get("size")
    if not isinstance(size, list) or size != [height, width]:
        raise CocoError(f"{where}: RLE size {size} does not match the image's [height, width] = {[height, width]}")
    counts = segmentation.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise CocoError(f"{where}: RLE counts must be non-negative integers")
        if sum(counts) != width * height:
            raise CocoError(f"{where}: RLE counts cover {sum(counts)} pixels, not {width * height}")
        return coco_mask.frPyObjects(dict(segmentation), height, width)
    if not isinstance(counts, str | bytes) or not counts:
        raise CocoError(f"{where}: RLE counts must be a compressed string or a list of run lengths")
    return {"size": [height, width], "counts": counts}


def segmentation_to_mask(segmentation: Any, width: int, height: int, where: str) -> np.ndarray:
    """Boolean mask of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, dict):
        rle = _checked_rle(segmentation, width, height, where)
        try:
            return coco_mask.decode(rle).astype(bool)
        except Exception as exc:  # pycocotools raises bare ValueError / TypeError variants
            raise CocoError(f"{where}: cannot decode the RLE: {exc}") from exc
    rings = _rings(segmentation, width, height, where)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(rings, height, width))).astype(bool)


def object_mask(obj: Mapping[str, Any], width: int, height: int, where: str) -> np.ndarray:
    """Mask of a COCO annotation or result: its segmentation, or its bbox when it has none."""
    segmentation = obj.get("segmentation")
    if segmentation:
        return segmentation_to_mask(segmentation, width, height, where)
    bbox = obj.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise CocoError(f"{where}: the object has neither a segmentation nor a bbox")
    rles = coco_mask.frPyObjects(np.array([bbox], dtype=np.float64), height, width)  # boxes: an array, not lists
    return coco_mask.decode(rles)[:, :, 0].astype(bool)


def _checked_vertices(rings: list[list[float]], width: int, height: int, where: str) -> list[list[float]]:
    """``rings`` after checking what pycocotools cannot take: it casts vertices to C ints and
    walks every edge pixel by pixel, so a non-finite or far-away vertex kills the process."""
    limit = MAX_VERTEX_SPAN * max(width, height)
    if not all(math.isfinite(v) and abs(v) <= limit for ring in rings for v in ring):
        raise CocoError(f"{where}: vertices must be finite and within {MAX_VERTEX_SPAN} image sizes of the image")
    return rings


def _rings(segmentation: Any, width: int, height: int, where: str) -> list[list[float]]:
    if not isinstance(segmentation, list) or not all(isinstance(r, list) for r in segmentation):
        raise CocoError(f"{where}: segmentation must be a list of polygons or an RLE object")
    if any(len(ring) < 6 or len(ring) % 2 for ring in segmentation):
        raise CocoError(f"{where}: every polygon needs an even number (at least 6) of coordinates")
    if not all(_is_number(v) for ring in segmentation for v in ring):
        raise CocoError(f"{where}: polygon coordinates must be numbers")
    return _checked_vertices([[float(v) for v in ring] for ring in segmentation], width, height, where)


_PREFERENCE = {
    "rle": ("brushlabels", "bitmasklabels", "polygonlabels", "rectanglelabels"),
    "ring": ("polygonlabels", "brushlabels", "bitmasklabels", "rectanglelabels"),
    "rings": ("brushlabels", "bitmasklabels", "polygonlabels", "rectanglelabels"),
    "box": ("rectanglelabels", "polygonlabels", "brushlabels", "bitmasklabels"),
}


def _pick_control(config: ProjectConfig, label: str, shape: str, where: str) -> OutputControl:
    """The output control for a COCO object: the one that stores its shape most faithfully
    (masks -> brush, one ring -> polygon, bbox only -> rectangle)."""
    controls = [c for c in config.export_outputs() if label in c.label_values()]
    if not controls:
        raise CocoError(f"{where}: category {label!r} is not a label of the label config")
    for kind in _PREFERENCE[shape]:
        for control in controls:
            if control.type == kind:
                return control
    raise CocoError(f"{where}: no output control for label {label!r}")  # unreachable: OUTPUT_TYPES


def _polygon_results(
    ring: Sequence[float], control: OutputControl, label: str, width: int, height: int
) -> list[dict[str, Any]]:
    points = [[x * 100.0 / width, y * 100.0 / height] for x, y in zip(ring[0::2], ring[1::2], strict=True)]
    return labelled_results(control, width, height, {"points": points, "closed": True}, label)


def _coco_object_regions(
    obj: Mapping[str, Any],
    label: str,
    config: ProjectConfig,
    width: int,
    height: int,
    polygon_tolerance: float,
    where: str,
) -> list[dict[str, Any]]:
    """Label Studio regions (without score) for one COCO annotation or result."""
    segmentation = obj.get("segmentation")
    bbox = obj.get("bbox")
    if isinstance(segmentation, dict):
        shape = "rle"
    elif segmentation:
        shape = "ring" if len(_rings(segmentation, width, height, where)) == 1 else "rings"
    elif isinstance(bbox, list) and len(bbox) == 4:
        shape = "box"
    else:
        raise CocoError(f"{where}: the object has neither a segmentation nor a bbox")
    control = _pick_control(config, label, shape, where)
    if control.type == "polygonlabels" and shape in ("ring", "rings"):
        rings = _rings(segmentation, width, height, where)
        return [result for ring in rings for result in _polygon_results(ring, control, label, width, height)]
    if control.type == "rectanglelabels" and shape == "ring":
        value = _rectangle_value(_rings(segmentation, width, height, where)[0], width, height)
        if value is not None:  # an exported rectangle, rotation and sub-pixel corners included
            return labelled_results(control, width, height, value, label)
    if control.type == "rectanglelabels" and isinstance(bbox, list) and len(bbox) == 4:
        if not all(_is_number(v) for v in bbox):
            raise CocoError(f"{where}: bbox must be [x, y, width, height] numbers, not {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        box, mask = (x, y, x + w, y + h), None  # the stored box as it is, not snapped to pixels
    else:
        mask = object_mask(obj, width, height, where)
        x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
        box = (float(x), float(y), float(x + w), float(y + h))  # what a rectangle control keeps of a mask
    try:
        regions = encode_instance(Instance(label, 0.0, box, mask), control, width, height, polygon_tolerance)
    except ValueError as exc:
        raise CocoError(f"{where}: {exc}") from exc
    for region in regions:
        region.pop("score", None)
    return regions


def _image_path(root: str, file_name: str) -> str:
    if not root or "://" in file_name or file_name.startswith(("/", "data:")):
        return file_name
    return root + file_name if root.endswith(("/", "=")) else f"{root}/{file_name}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dataset_parts(
    dataset: Any, source: str = "the COCO file"
) -> tuple[list[dict[str, Any]], dict[int, str], list[dict[str, Any]]]:
    """Images, category names by id and annotations of a COCO dataset, checked so that a wrong
    file (a Label Studio export, a results list) or a malformed entry is a ``CocoError``
    naming it rather than a KeyError deep inside pycocotools."""
    if isinstance(dataset, list):
        raise CocoError(
            f"{source} is a list, not a COCO dataset: a Label Studio JSON export or a COCO "
            "results file was given where the instances file (images, categories, annotations) belongs"
        )
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise CocoError(f"{source} has no 'images' list (a results file needs its dataset beside it)")
    cats = dataset.get("categories")
    if not isinstance(cats, list) or not cats:
        raise CocoError(f"{source} has no 'categories'")
    names: dict[int, str] = {}
    for cat in cats:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise CocoError(f"category {cat!r} needs an integer 'id' and a 'name'")
        names[cat["id"]] = cat["name"]
    images = dataset["images"]
    if not images:
        raise CocoError(f"{source} has no images: nothing to convert or evaluate")
    seen: set[int] = set()
    for number, image in enumerate(images, start=1):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise CocoError(f"image #{number} of {source} has no integer 'id'")
        iid, width, height = image["id"], image.get("width"), image.get("height")
        if not all(_is_int(v) and v > 0 for v in (width, height)):
            raise CocoError(
                f"image {iid} ({image.get('file_name')!r}) needs positive integer width and height, "
                f"it has {width!r} x {height!r}"
            )
        if iid in seen:
            raise CocoError(f"image id {iid} appears twice in {source}")
        seen.add(iid)
    annotations = dataset.get("annotations") or []
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise CocoError(f"the 'annotations' of {source} are not a list of objects")
    return images, names, annotations


def coco_to_ls(
    dataset: Mapping[str, Any],
    config: ProjectConfig,
    *,
    image_root: str = "",
    results: Sequence[Mapping[str, Any]] | None = None,
    as_annotations: bool = False,
    model_version: str = DEFAULT_MODEL_VERSION,
    polygon_tolerance: float = 1.0,
) -> list[dict[str, Any]]:
    """Label Studio tasks (import JSON) for a COCO dataset, one task per image.

    The dataset's annotations become each task's annotation when ``as_annotations`` (an image
    without annotations becomes an empty annotation: labelled, no objects), else its
    prediction, unless ``results`` (a COCO results list) supplies the predictions, with their
    scores; the prediction's score is the mean of its regions' scores. Each object goes to the
    output control that stores it most faithfully (RLE -> brush, a single polygon -> polygon,
    bbox only -> rectangle, then the next best the config offers). ``data[<image key>]`` is
    ``image_root`` joined with ``file_name`` (kept verbatim when it is already a URL or a
    Label Studio path). The task ``id`` is the COCO image id (Label Studio assigns its own on
    import), and ``meta`` keeps the image size for images without regions.
    """
    images, names, dataset_annotations = _dataset_parts(dataset)
    image_ids = {img.get("id") for img in images}
    grouped: dict[str, dict[Any, list[Mapping[str, Any]]]] = {"annotations": defaultdict(list)}
    if as_annotations or results is None:
        for ann in dataset_annotations:
            if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
                raise CocoError(
                    f"annotation {ann.get('id')!r}: image_id {ann.get('image_id')!r} is not an image of the dataset"
                )
            grouped["annotations"][ann["image_id"]].append(ann)
    if results is not None:
        if not all(isinstance(res, Mapping) for res in results):
            raise CocoError("the results are not a COCO results list (a list of objects)")
        grouped["results"] = defaultdict(list)
        for number, res in enumerate(results, start=1):
            if not _is_int(res.get("image_id")) or res["image_id"] not in image_ids:
                raise CocoError(f"result #{number}: image_id {res.get('image_id')!r} is not an image of the dataset")
            grouped["results"][res["image_id"]].append(res)
    tasks: list[dict[str, Any]] = []
    for image in images:
        iid, width, height = image["id"], image["width"], image["height"]
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise CocoError(f"image {iid} has no file_name")
        task: dict[str, Any] = {
            "id": iid,
            "data": {config.image_value_key: _image_path(image_root, image["file_name"])},
            "meta": {"original_width": width, "original_height": height},
        }
        for source, by_image in grouped.items():
            regions: list[dict[str, Any]] = []
            scores: list[float] = []
            for number, obj in enumerate(by_image.get(iid, []), start=1):
                where = f"image {iid} ({image['file_name']}), {source[:-1]} {obj.get('id', number)!r}"
                label = names.get(obj["category_id"]) if _is_int(obj.get("category_id")) else None
                if label is None:
                    raise CocoError(f"{where}: category_id {obj.get('category_id')!r} is not in the categories")
                new = _coco_object_regions(obj, label, config, width, height, polygon_tolerance, where)
                score = obj.get("score")
                if score is not None:
                    if not _is_number(score):
                        raise CocoError(f"{where}: 'score' must be a number, not {score!r}")
                    scores.append(float(score))
                    for region in new:
                        region["score"] = float(score)
                regions.extend(new)
            if source == "annotations" and as_annotations:
                task["annotations"] = [{"result": regions, "ground_truth": False, "was_cancelled": False}]
            elif regions:
                prediction: dict[str, Any] = {"model_version": model_version, "result": regions}
                if scores:
                    prediction["score"] = sum(scores) / len(scores)
                task["predictions"] = [prediction]
        tasks.append(task)
    return tasks


# --------------------------------------------------------------------------- evaluation


def _metric(value: float) -> float | None:
    """COCOeval reports -1 for "no ground truth"; JSON gets null instead of a fake score."""
    return None if value < 0 else float(value)


def _quiet(call: Any, *args: Any, **kwargs: Any) -> Any:
    """pycocotools prints progress on stdout; the CLI's stdout is the report table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return call(*args, **kwargs)


def _coco_from_dict(dataset: Mapping[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dict(dataset))
    _quiet(coco.createIndex)
    return coco


def _run_cocoeval(gt: COCO, dt: COCO, iou_type: str) -> COCOeval:
    evaluator = COCOeval(gt, dt, iou_type)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return evaluator


def _eval_object(obj: Mapping[str, Any], image: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A copy of a ground-truth annotation or result with what COCOeval reads, checked against
    its image: a segmentation (the bbox's rectangle when it has none, as pycocotools' loadRes
    makes for box-only results), a bbox (the mask's when missing), ``area`` and ``iscrowd``
    (COCOeval needs both; other tools omit them)."""
    width, height = image["width"], image["height"]
    out = copy.deepcopy(dict(obj))
    if "area" in obj and not _is_number(obj["area"]):
        raise CocoError(f"{where}: area must be a number, not {obj['area']!r}")
    if obj.get("iscrowd", 0) not in (0, 1):
        raise CocoError(f"{where}: iscrowd must be 0 or 1, not {obj['iscrowd']!r}")
    segmentation, bbox = obj.get("segmentation"), obj.get("bbox")
    has_box = isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
    if bbox is not None and not has_box:
        raise CocoError(f"{where}: bbox must be [x, y, width, height] numbers, not {bbox!r}")
    if segmentation:
        if isinstance(segmentation, dict):
            rle = _checked_rle(segmentation, width, height, where)
        else:
            rle = coco_mask.merge(coco_mask.frPyObjects(_rings(segmentation, width, height, where), height, width))
        out.setdefault("area", float(coco_mask.area(rle)))
        if not has_box:
            out["bbox"] = [float(v) for v in coco_mask.toBbox(rle)]
    elif has_box:
        x, y, w, h = (float(v) for v in bbox)
        out["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
        out.setdefault("area", w * h)
    else:
        raise CocoError(f"{where}: the object has neither a segmentation nor a bbox")
    out.setdefault("iscrowd", 0)
    return out


def _eval_inputs(gt: Any, results: Any) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The ground truth with checked annotations, the results on its images and categories
    (checked), and how many results were left out; a malformed object is a ``CocoError``
    naming its image and annotation id (or result number) instead of a pycocotools KeyError
    or a silent AP of 0."""
    images, names, annotations = _dataset_parts(gt, "the ground truth")
    by_id = {image["id"]: image for image in images}

    def where(image: Mapping[str, Any], what: str) -> str:
        return f"image {image['id']} ({image.get('file_name')!r}), {what}"

    checked: list[dict[str, Any]] = []
    ann_ids: set[int] = set()
    for number, ann in enumerate(annotations, start=1):
        aid = ann.get("id")
        if not _is_int(aid) or aid in ann_ids:
            raise CocoError(f"ground-truth annotation #{number} needs a unique integer 'id', it has {aid!r}")
        ann_ids.add(aid)
        image = by_id.get(ann["image_id"]) if _is_int(ann.get("image_id")) else None
        if image is None:
            raise CocoError(f"annotation {aid}: image_id {ann.get('image_id')!r} is not an image of the ground truth")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in names:
            raise CocoError(f"{where(image, f'annotation {aid}')}: category_id {ann.get('category_id')!r} is unknown")
        checked.append(_eval_object(ann, image, where(image, f"annotation {aid}")))
    if not isinstance(results, list) or not all(isinstance(r, Mapping) for r in results):
        raise CocoError("the results are not a COCO results list (a list of objects)")
    kept: list[dict[str, Any]] = []
    for number, res in enumerate(results, start=1):
        image = by_id.get(res["image_id"]) if _is_int(res.get("image_id")) else None
        if image is None or not _is_int(res.get("category_id")) or res["category_id"] not in names:
            continue
        if not _is_number(res.get("score")):
            raise CocoError(f"{where(image, f'result #{number}')}: 'score' must be a number, not {res.get('score')!r}")
        kept.append(_eval_object(res, image, where(image, f"result #{number}")))
    return {**gt, "annotations": checked}, kept, len(results) - len(kept)


def evaluate(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.0,
) -> dict[str, Any]:
    """COCOeval ``segm`` and ``bbox`` of ``results`` against the dataset ``gt``.

    Returns AP, AP50 and AP75 per IoU type, per-category AP, and, at ``iou_threshold`` (one of
    COCOeval's thresholds, 0.50:0.05:0.95) using COCOeval's own greedy matching (highest score
    first, at most 100 detections per image and category): matched, missed and extra object
    counts per label and the mean mask IoU of matched pairs. ``score_threshold`` drops low
    scores from those counts only (AP uses every score). Because matching is greedy by score,
    dropping the low scores afterwards gives the same matches as never having had them.
    Results on images or categories the dataset does not have are counted in ``ignored``.
    Malformed input (an RLE of another size than its image, an image without width / height,
    an object without segmentation and bbox, a Label Studio export instead of a COCO dataset)
    is a ``CocoError`` naming the image and annotation id or result number.
    """
    gt, kept, ignored = _eval_inputs(gt, results)
    gt_coco = _coco_from_dict(gt)
    if kept:
        dt_coco = _quiet(gt_coco.loadRes, kept)
    else:
        dt_coco = _coco_from_dict({**gt, "annotations": []})
    evaluators = {iou_type: _run_cocoeval(gt_coco, dt_coco, iou_type) for iou_type in ("segm", "bbox")}
    segm = evaluators["segm"]
    thresholds = segm.params.iouThrs
    matches = np.flatnonzero(np.isclose(thresholds, iou_threshold))
    if not matches.size:
        raise ValueError(f"iou_threshold must be one of {[round(float(t), 2) for t in thresholds]}")
    t_index = int(matches[0])

    per_category: dict[str, dict[str, Any]] = {}
    all_ious: list[float] = []
    for k, cat_id in enumerate(segm.params.catIds):
        name = gt_coco.cats[cat_id]["name"]
        row: dict[str, Any] = {}
        for iou_type, evaluator in evaluators.items():
            precision = evaluator.eval["precision"][:, :, k, 0, -1]
            valid = precision[precision > -1]
            row[f"AP_{iou_type}"] = float(valid.mean()) if valid.size else None
        gt_count = matched = predicted = 0
        ious: list[float] = []
        for record in segm.evalImgs:
            if record is None or record["category_id"] != cat_id or record["aRng"] != segm.params.areaRng[0]:
                continue
            gt_count += int(np.count_nonzero(np.asarray(record["gtIgnore"]) == 0))
            for d, dt_id in enumerate(record["dtIds"]):
                if record["dtIgnore"][t_index][d] or record["dtScores"][d] < score_threshold:
                    continue
                predicted += 1
                gt_id = int(record["dtMatches"][t_index][d])
                if gt_id:
                    matched += 1
                    ious.append(
                        float(
                            coco_mask.iou(
                                [dt_coco.annToRLE(dt_coco.anns[dt_id])],
                                [gt_coco.annToRLE(gt_coco.anns[gt_id])],
                                [0],
                            )[0][0]
                        )
                    )
        all_ious.extend(ious)
        row.update(
            gt=gt_count,
            predicted=predicted,
            matched=matched,
            missed=gt_count - matched,
            extra=predicted - matched,
            mean_iou=float(np.mean(ious)) if ious else None,
        )
        per_category[name] = row

    def summary(evaluator: COCOeval) -> dict[str, float | None]:
        return {
            "AP": _metric(evaluator.stats[0]),
            "AP50": _metric(evaluator.stats[1]),
            "AP75": _metric(evaluator.stats[2]),
        }

    return {
        "images": len(gt["images"]),
        "ground_truth": sum(row["gt"] for row in per_category.values()),
        "predictions": len(kept),
        "ignored": ignored,
        "iou_threshold": float(thresholds[t_index]),
        "score_threshold": float(score_threshold),
        "segm": summary(segm),
        "bbox": summary(evaluators["bbox"]),
        "mean_iou": float(np.mean(all_ious)) if all_ious else None,
        "per_category": per_category,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_evaluation(report: Mapping[str, Any]) -> str:
    """A plain-text table of an ``evaluate`` report for the terminal."""
    lines = [
        f"images {report['images']}  ground truth {report['ground_truth']}  predictions "
        f"{report['predictions']}  ignored {report['ignored']}",
        "",
        f"{'':6}{'AP':>8}{'AP50':>8}{'AP75':>8}",
    ]
    for iou_type in ("segm", "bbox"):
        stats = report[iou_type]
        lines.append(f"{iou_type:6}" + "".join(f"{_cell(stats[k]):>8}" for k in ("AP", "AP50", "AP75")))
    lines.append(f"mean mask IoU of matched pairs (IoU >= {report['iou_threshold']:.2f}): {_cell(report['mean_iou'])}")
    lines.append("")
    columns = ("AP_segm", "AP_bbox", "gt", "predicted", "matched", "missed", "extra", "mean_iou")
    width = max([5, *(len(name) for name in report["per_category"])]) + 2
    lines.append(f"{'label':{width}}" + "".join(f"{c:>10}" for c in columns))
    for name, row in report["per_category"].items():
        lines.append(f"{name:{width}}" + "".join(f"{_cell(row[c]):>10}" for c in columns))
    return "\n".join(lines)
