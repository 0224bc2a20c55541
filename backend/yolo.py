"""COCO instances -> YOLO segmentation labels (Ultralytics format), for YOLO-seg trainers.

Layout written under the output directory::

    data.yaml            class names (index = position of the category, config order);
                         ``train`` / ``val`` point at ``images``: copy the images there
    labels/<stem>.txt    one line per object: ``<class> x1 y1 x2 y2 ...``, coordinates
                         normalised to [0, 1] by the image width / height; an image without
                         objects gets an empty file (a background image)

The export is all or nothing: files are written to a temporary directory beside the output,
then ``labels/`` and ``data.yaml`` replace the output's by renaming (a label file of an earlier
export does not linger; ``images/`` and other files are left alone). A failure leaves the
output as it was.

A YOLO line holds ONE polygon, while a Label Studio region can have several parts and holes.
Convention used here (the one Ultralytics' own COCO converter uses for multi-part objects,
extended to holes): every outer boundary and every hole boundary of the object is traced, and
the rings are joined into one polygon by zero-width bridges (each ring is spliced in at its
vertex nearest to the polygon built so far: there and back along the same segment). Both
Ultralytics' rasteriser (``cv2.fillPoly``) and pycocotools fill polygons by the even-odd rule,
so the bridges enclose nothing and the holes stay empty; a rasteriser that draws boundaries
may paint a bridge as a 1-pixel line.

Tracing is ``backend.regions.mask_to_polygons`` (the same outlines Label Studio polygons
get, one place for mask tracing): vertices on pixel edges, then Douglas-Peucker with
``polygon_tolerance`` pixels (default 1.0, the backend's ``POLYGON_TOLERANCE``). With 0 every
corner is kept, and pycocotools' rasterisation of the line gives back the mask pixel for
pixel where outlines have no diagonal (corner-to-corner) steps; there the outline is within
half a pixel. Parts of 1-2 pixels become their bounding square, so no part is dropped. Holes
are background components that do not touch the image border (4-connected, the dual of the
8-connected foreground).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np

from backend.coco import CocoError, file_name_candidates, object_mask
from backend.regions import mask_to_polygons

COORD_FORMAT = "{:.6f}"  # 1e-6 of the image side: below 0.01 px up to 10000 px images


def _holes(mask: np.ndarray) -> np.ndarray:
    count, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    enclosed = np.ones(count, dtype=bool)
    enclosed[0] = False  # label 0 is the object itself
    enclosed[border] = False
    return enclosed[labels]


def _bridge(rings: list[np.ndarray]) -> np.ndarray:
    """Join rings into one closed polygon with zero-width bridges (see the module doc)."""
    merged = rings[0]
    for ring in rings[1:]:
        distances = ((merged[:, None, :] - ring[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        merged = np.concatenate([merged[: i + 1], np.roll(ring, -j, axis=0), ring[j : j + 1], merged[i:]])
    return merged


def mask_to_yolo_polygon(mask: np.ndarray, polygon_tolerance: float = 1.0) -> np.ndarray | None:
    """One ``(n, 2)`` polygon in pixels covering every part and hole of ``mask`` (None if empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    height, width = mask.shape
    scale = np.array([width / 100.0, height / 100.0])
    rings = [np.asarray(p) * scale for p in mask_to_polygons(mask, polygon_tolerance)]
    rings += [np.asarray(p) * scale for p in mask_to_polygons(_holes(mask), polygon_tolerance)]
    return _bridge(rings)


def _label_stem(file_name: str, image_id: Any) -> str:
    stem = PurePosixPath(file_name_candidates(file_name, image_id)[1]).stem
    if not stem:
        raise CocoError(f"image {image_id}: cannot derive a label file name from {file_name!r}")
    return stem


def coco_to_yolo(dataset: Mapping[str, Any], polygon_tolerance: float = 1.0) -> dict[str, str]:
    """Relative path -> text of every file of the YOLO dataset (nothing is written here, so a
    bad object fails the export before any file changes)."""
    cats = sorted(dataset.get("categories") or [], key=lambda c: c["id"])
    if not cats:
        raise CocoError("the dataset has no categories")
    class_of = {c["id"]: index for index, c in enumerate(cats)}
    lines: dict[Any, list[str]] = {img["id"]: [] for img in dataset.get("images") or []}
    images = {img["id"]: img for img in dataset.get("images") or []}
    for ann in dataset.get("annotations") or []:
        image = images.get(ann["image_id"])
        if image is None:
            raise CocoError(f"annotation {ann.get('id')!r}: image {ann['image_id']!r} is not in the dataset")
        width, height = image["width"], image["height"]
        where = f"image {image['id']} ({image['file_name']}), annotation {ann.get('id')!r}"
        if ann["category_id"] not in class_of:
            raise CocoError(f"{where}: category_id {ann['category_id']!r} is not in the categories")
        polygon = mask_to_yolo_polygon(object_mask(ann, width, height, where), polygon_tolerance)
        if polygon is None:
            continue
        coords = np.clip(polygon / (width, height), 0.0, 1.0).ravel()
        lines[image["id"]].append(
            " ".join([str(class_of[ann["category_id"]])] + [COORD_FORMAT.format(v) for v in coords])
        )
    files: dict[str, str] = {}
    owner: dict[str, Any] = {}
    for image_id, image in images.items():
        path = f"labels/{_label_stem(image['file_name'], image_id)}.txt"
        if path in owner:
            raise CocoError(
                f"images {owner[path]} and {image_id} would both write {path}; "
                "their file names share a stem (rename one, or export without --keep-paths)"
            )
        owner[path] = image_id
        files[path] = "".join(f"{line}\n" for line in lines[image_id])
    names = "".join(f"  {index}: {json.dumps(c['name'])}\n" for index, c in enumerate(cats))
    files["data.yaml"] = (
        "# YOLO segmentation dataset written by grounded-sam-backend export-yolo\n"
        "# put the images in images/ (label files in labels/ match them by file name)\n"
        f"train: images\nval: images\nnames:\n{names}"
    )
    return files


def write_yolo(dataset: Mapping[str, Any], out_dir: str | Path, polygon_tolerance: float = 1.0) -> dict[str, str]:
    """Convert ``dataset`` and put it under ``out_dir`` all at once (see the module doc); returns
    the files. Writing file by file into the output would leave a mix of old and new label
    files when a write fails, and stale label files of images no longer exported."""
    files = coco_to_yolo(dataset, polygon_tolerance)
    root = Path(out_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    # mkdtemp's 0700 would become the export's own mode on rename: take its parent folder's
    staging.chmod(root.parent.stat().st_mode & 0o777)
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if not root.exists():
            staging.rename(root)
            return files
        labels, previous = root / "labels", staging / "labels.previous"
        with contextlib.ExitStack() as undo:  # on failure, put back what was already moved
            if labels.exists():
                labels.rename(previous)
                undo.callback(previous.rename, labels)
            (staging / "labels").rename(labels)
            undo.callback(labels.rename, staging / "labels")
            os.replace(staging / "data.yaml", root / "data.yaml")
            undo.pop_all()
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)
