"""Assisted-manual stage: the annotator's clicks, box or phrase -> one mask, from the cached embedding.

Rules (documented in the README):
- Points: every keypoint of ``context.result`` is a point; it is negative when the item's
  ``is_positive`` is false (Label Studio's UI, Alt-click), else when ``value.positive`` is false
  (the newest official backends' shape); ``is_positive`` wins when both are present.
- Box: the last rectangle of the context (axis-aligned bounds when rotated).
- Image: every prompt item's ``to_name`` must be the project's image (the first image with
  output controls); a click on another image is a clear error, never run on the wrong image.
- Label: the label of the labelled context items (a bare smart ``<KeyPoint>`` or
  ``<Rectangle>`` sends its label as a separate ``labels`` item); items naming different
  labels are a clear error naming them. With no label, the config's only mask label, else the
  only label of any output control, else a clear error asking to pick one.
- Output control: the first mask control (Brush, Bitmask, Polygon, labelled or a bare tool with
  ``<Labels>``) offering the label, in config order; a rectangle control when no mask control
  offers it.
- One positive point and nothing else: SAM's three candidates, the best predicted IoU wins.
- One answer is one region: for a Polygon control (one polygon per connected part) only the
  part holding the positive clicks is kept (the largest such part, or the largest part when no
  click lies in one).
- Refinement memory: the previous answer's low-resolution logits for the same project, task,
  annotator, label and image are fed back as the mask prompt when the new prompts extend the
  previous ones (same box, the remembered points as a prefix, more points). The annotator is
  the ``user`` of the task's drafts: Label Studio sends an interactive request only the
  requesting user's drafts. Before an annotator has a draft nothing names them, and two such
  annotators of one task share a key; only a click sequence that starts with exactly the other
  one's clicks (same coordinates) would then pick up their mask.
- Prewarm: ``context.event == "prewarm"`` only computes and caches the image embedding and
  answers no regions, so the first real click is warm.
- Remembered phrase (``REMEMBER_TEXT_PROMPT``): the last smart-TextArea phrase of a project and
  its label replace that label's prompts in the project's next pre-annotations.
- Refine what is there (``REFINE_EXISTING``): when the first positive click lands inside a region
  of the task's draft, annotation or prediction with the same label, that region's mask (and its
  bounding box, unless a box was drawn) seeds SAM, so one click fixes a pre-annotated mask.
  Per-click cost stays flat as the task's regions grow: a brush region is tested at the clicked
  pixel by reading its RLE only up to that pixel, a polygon clearly away from the click is
  skipped before rasterising, and only the region found is decoded.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from backend import brush_rle
from backend.embedding_cache import EmbeddingCache, cache_key
from backend.labeling import MASK_TYPES, OutputControl, ProjectConfig, split_prompt
from backend.models.base import Box, ConceptSegmenter, Detector, ImageEmbedding, PromptSet, Segmenter
from backend.pipelines.preannotate import PreannotateParams, find_instances
from backend.regions import (
    MAX_VERTEX_SPAN,
    Instance,
    brush_rle_bytes,
    decode_region_mask,
    join_split_results,
)


class InteractiveError(ValueError):
    """The context cannot be turned into a prompt; the message tells the annotator why."""


@dataclass(frozen=True)
class ClickRequest:
    """Prompts of one interactive call, in image pixels."""

    label: str
    control: OutputControl
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    box: Box | None = None
    text: str | None = None


def _is_positive(item: Mapping[str, Any]) -> bool:
    if "is_positive" in item and item["is_positive"] is not None:
        return bool(item["is_positive"])
    value = item.get("value") or {}
    if "positive" in value and value["positive"] is not None:
        return bool(value["positive"])
    return True


def _item_label(item: Mapping[str, Any]) -> str | None:
    value = item.get("value") or {}
    for key in (item.get("type", ""), "keypointlabels", "rectanglelabels", "labels"):
        labels = value.get(key) if key else None
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def _number(value: Mapping[str, Any], key: str) -> float:
    raw = value.get(key)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise InteractiveError(f"context value.{key} must be a number, got {raw!r}")
    return float(raw)


def _rectangle_box(value: Mapping[str, Any], width: int, height: int) -> Box:
    """Percent box (rotated about its top-left corner, as Label Studio stores it) -> pixel
    bounds clipped to the image."""
    x = _number(value, "x") * width / 100
    y = _number(value, "y") * height / 100
    w = _number(value, "width") * width / 100
    h = _number(value, "height") * height / 100
    angle = math.radians(_number(value, "rotation") if value.get("rotation") is not None else 0.0)
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    xs = [x + cx * cos - cy * sin for cx, cy in corners]
    ys = [y + cx * sin + cy * cos for cx, cy in corners]
    x0, x1 = max(min(xs), 0.0), min(max(xs), float(width))
    y0, y1 = max(min(ys), 0.0), min(max(ys), float(height))
    if x1 <= x0 or y1 <= y0:
        raise InteractiveError("the drawn box lies outside the image or has no area")
    return (x0, y0, x1, y1)


def output_for_label(project: ProjectConfig, label: str) -> OutputControl:
    """The control that receives the mask of ``label`` (rule in the module docstring)."""
    masks = project.mask_outputs_for(label)
    if masks:
        return masks[0]
    for control in project.outputs:
        if label in control.label_values():
            return control
    raise InteractiveError(
        f"label {label!r} is not offered by any Brush/Bitmask/Polygon/Rectangle labels control of this project"
    )


def _default_label(project: ProjectConfig) -> str:
    """The label of an unlabelled click: the only mask label; with no mask control, the only
    label of any output (a RectangleLabels-only project with one label needs no choice)."""
    mask_labels = {label for c in project.outputs if c.is_mask for label in c.label_values()}
    choices = mask_labels or set(project.label_values())
    if len(choices) == 1:
        return next(iter(choices))
    raise InteractiveError(
        f"the click carries no label and the project offers several ({', '.join(sorted(choices))}): "
        "select a label on the smart tool before clicking"
    )


_PROMPT_ITEM_TYPES = ("keypointlabels", "keypoint", "rectanglelabels", "rectangle", "textarea", "labels")


def _check_image(item: Mapping[str, Any], kind: str, project: ProjectConfig) -> None:
    """A prompt drawn on another image than the project's (which is the only one segmented)
    would be answered with a mask of the wrong image: refuse it by name."""
    to_name = item.get("to_name")
    if to_name is not None and to_name != project.image_name:
        raise InteractiveError(
            f"the {kind} item is on image {to_name!r}, but this backend segments only the project's "
            f"image {project.image_name!r} (the first image with a mask or rectangle control)"
        )


def parse_context(context: Mapping[str, Any], project: ProjectConfig, width: int, height: int) -> ClickRequest:
    """Label Studio's ``params.context`` -> prompts in pixels, or ``InteractiveError``."""
    items = context.get("result")
    if not isinstance(items, list) or not items:
        raise InteractiveError("the interactive context has no result items (no click, box or text)")
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box: Box | None = None
    text: str | None = None
    named: dict[str, None] = {}  # labels of the items, in order, once each
    for item in items:
        if not isinstance(item, Mapping):
            raise InteractiveError("every context result item must be an object")
        kind = str(item.get("type", "")).lower()
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise InteractiveError(f"context item of type {kind!r} has no value object")
        if kind in _PROMPT_ITEM_TYPES:
            _check_image(item, kind, project)
        if kind == "keypointlabels" or kind == "keypoint":
            x, y = _number(value, "x"), _number(value, "y")
            if not (0 <= x <= 100 and 0 <= y <= 100):
                raise InteractiveError(f"the click at ({x:.1f}%, {y:.1f}%) lies outside the image")
            points.append((min(x * width / 100, width - 0.5), min(y * height / 100, height - 0.5)))
            labels.append(1 if _is_positive(item) else 0)
        elif kind in ("rectanglelabels", "rectangle"):
            box = _rectangle_box(value, width, height)
        elif kind == "textarea":
            texts = value.get("text")
            joined = " . ".join(t for t in texts if isinstance(t, str)) if isinstance(texts, list) else ""
            text = joined.strip() or None
            continue
        elif kind != "labels":  # a labels item names the label of a bare smart tool's click or box
            continue
        item_label = _item_label(item)
        if item_label is not None:
            named[item_label] = None
    if points and box is None and 1 not in labels:
        raise InteractiveError("only negative points were clicked: add a positive point or draw a box")
    if not points and box is None and text is None:
        raise InteractiveError("the context holds no keypoint, rectangle or text prompt")
    if len(named) > 1:
        raise InteractiveError(
            f"the context mixes the labels {', '.join(map(repr, named))}: one answer gets one label; "
            "remove the points or box of the other label before clicking"
        )
    label = next(iter(named), None) or _default_label(project)
    return ClickRequest(label, output_for_label(project, label), tuple(points), tuple(labels), box, text)


@dataclass
class _Memory:
    points: tuple[tuple[float, float], ...]
    point_labels: tuple[int, ...]
    box: Box | None
    logits: np.ndarray


MemoryKey = tuple[str, ...]


class RefinementMemory:
    """Last low-res logits per (project, task, annotator, label, image), bounded by entry count.

    Reused only when the new prompts extend the remembered ones (same box, remembered points
    as a prefix, at least one point more; a box alone then box + points counts): a fresh click
    sequence, another annotator's clicks or another task never picks up someone else's mask.
    """

    def __init__(self, max_entries: int = 512) -> None:
        self._entries: OrderedDict[MemoryKey, _Memory] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def recall(self, key: MemoryKey, request: ClickRequest) -> np.ndarray | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.box != request.box:
            return None
        n = len(entry.points)
        if len(request.points) <= n:
            return None
        if request.points[:n] != entry.points or request.point_labels[:n] != entry.point_labels:
            return None
        return entry.logits

    def remember(self, key: MemoryKey, request: ClickRequest, logits: np.ndarray) -> None:
        with self._lock:
            self._entries[key] = _Memory(request.points, request.point_labels, request.box, logits)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _task_regions(task: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Regions of the task's drafts, then annotations, then predictions (newest work first); a
    bare tool's result and its ``<Labels>`` result are one labelled region."""
    for key in ("drafts", "annotations", "predictions"):
        entries = task.get(key)
        if not isinstance(entries, list):
            continue
        for entry in reversed(entries):
            result = entry.get("result") if isinstance(entry, Mapping) else None
            if isinstance(result, list):
                yield from (r for r in join_split_results(result) if isinstance(r, Mapping))


def _brush_covers(rle: Any, x: int, y: int, width: int, height: int) -> bool:
    """Whether a brush RLE paints pixel ``(x, y)``: its alpha value (RGBA, row-major), read
    without decoding the rest of the mask. ``ValueError`` for RLE that ``decode_region_mask``
    would reject as well (wrong type or size, truncated before the pixel)."""
    data = brush_rle_bytes(rle, width, height)
    return brush_rle.value_at(data, 4 * (y * width + x) + 3) > 0


POLYGON_MARGIN_PX = 1.0  # rasterising samples pixel centres: farther outside than this is never filled


def _polygon_far_from(value: Mapping[str, Any], x: int, y: int, width: int, height: int) -> bool:
    """Whether pixel ``(x, y)``'s centre lies clearly outside the polygon: then the region is
    skipped without rasterising it. Malformed points answer False and are left to the decoder."""
    try:
        points = np.asarray(value.get("points") or [], dtype=np.float64)
    except (TypeError, ValueError):
        return False
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        return False
    pixels = points * (width / 100.0, height / 100.0)
    if not np.isfinite(pixels).all() or np.abs(pixels).max() > MAX_VERTEX_SPAN * max(width, height):
        return False  # the decoder refuses such vertices with its own message
    contour = pixels.astype(np.float32)
    distance = cv2.pointPolygonTest(contour, (x + 0.5, y + 0.5), True)  # negative outside
    return distance < -POLYGON_MARGIN_PX


def find_existing_mask(
    task: Mapping[str, Any], label: str, point: tuple[float, float], width: int, height: int
) -> np.ndarray | None:
    """The mask of the first same-label region of the task under ``point``, if any.

    Only that region is decoded: brush regions are tested at the clicked pixel and polygons
    clearly away from it are skipped first, so a task carrying megabytes of regions costs
    about its JSON parse, not a full decode per region (~20 ms each on 640x480).
    """
    x, y = int(point[0]), int(point[1])
    for region in _task_regions(task):
        kind = str(region.get("type", "")).lower()
        value = region.get("value")
        labels = value.get(kind) if isinstance(value, Mapping) else None
        if kind not in MASK_TYPES or not isinstance(labels, list) or label not in labels:
            continue
        if (region.get("original_width"), region.get("original_height")) != (width, height):
            continue
        try:
            if kind == "brushlabels" and not _brush_covers(value.get("rle"), x, y, width, height):
                continue
            if kind == "polygonlabels" and _polygon_far_from(value, x, y, width, height):
                continue
            mask = decode_region_mask(dict(region))
        except (ValueError, IndexError):
            continue
        if mask.shape == (height, width) and mask[y, x]:
            return mask
    return None


def _bbox(mask: np.ndarray) -> Box:
    # row/column projections: np.nonzero on a 1024x768 mask lists every pixel (2 ms a click)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _one_part(mask: np.ndarray, points: Sequence[tuple[float, float]], point_labels: Sequence[int]) -> np.ndarray:
    """The 8-connected part of ``mask`` (the connectivity polygons are traced with) holding the
    positive clicks; the largest such part, or the largest part when no click lies in one."""
    count, parts, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    clicked = {int(parts[int(y), int(x)]) for (x, y), positive in zip(points, point_labels, strict=True) if positive}
    candidates = sorted(clicked - {0}) or list(range(1, count))
    best = max(candidates, key=lambda part: stats[part, cv2.CC_STAT_AREA])
    return parts == best


def _annotator(task: Mapping[str, Any]) -> str:
    """Who is clicking, as far as the request tells: Label Studio serialises an interactive
    request's task with only the requesting user's drafts (``InteractiveMixin``), each naming
    its ``user``. Empty when there is no draft yet (see the module docstring)."""
    drafts = task.get("drafts")
    for draft in drafts if isinstance(drafts, list) else ():
        user = draft.get("user") if isinstance(draft, Mapping) else None
        if isinstance(user, str | int) and not isinstance(user, bool) and str(user):
            return str(user)
    return ""


def image_embedding(
    image: Image.Image, image_sha256: str, segmenter: Segmenter, cache: EmbeddingCache
) -> ImageEmbedding:
    """The click segmenter's embedding of ``image``, computed once and cached: a ``prewarm``
    call runs only this, so the annotator's first real click is already warm."""
    return cache.get_or_compute(cache_key(image_sha256, segmenter.model_id), lambda: segmenter.embed(image))


def run_clicks(
    request: ClickRequest,
    task: Mapping[str, Any],
    image: Image.Image,
    image_sha256: str,
    segmenter: Segmenter,
    cache: EmbeddingCache,
    memory: RefinementMemory,
    refine_existing: bool,
) -> list[Instance]:
    """Points and/or box -> one mask instance under the request's label."""
    width, height = image.size
    anonymous = (str(task.get("project")), str(task.get("id")), "", request.label, image_sha256)
    memory_key = (*anonymous[:2], _annotator(task), *anonymous[3:])
    prompt = PromptSet(points=request.points, point_labels=request.point_labels, box=request.box)
    prompt.mask_logits = memory.recall(memory_key, request)
    if prompt.mask_logits is None and memory_key != anonymous:
        # the sequence may have begun before Label Studio saved this annotator's first draft
        prompt.mask_logits = memory.recall(anonymous, request)
    if prompt.mask_logits is None and refine_existing and 1 in request.point_labels:
        first_positive = request.points[request.point_labels.index(1)]
        existing = find_existing_mask(task, request.label, first_positive, width, height)
        if existing is not None:
            prompt.prior_mask = existing
            prompt.box = prompt.box or _bbox(existing)
    single_click = (
        len(request.points) == 1 and request.point_labels == (1,) and prompt.box is None
        and prompt.mask_logits is None and prompt.prior_mask is None
    )
    embedding = image_embedding(image, image_sha256, segmenter, cache)
    prediction = segmenter.segment(embedding, [prompt], multimask=single_click)[0]
    if prediction.low_res_logits is not None:
        memory.remember(memory_key, request, prediction.low_res_logits)
    mask = prediction.mask
    if not mask.any():
        return []
    if request.control.type == "polygonlabels":
        mask = _one_part(mask, request.points, request.point_labels)
    score = float(min(max(prediction.score, 0.0), 1.0))
    return [Instance(request.label, score, _bbox(mask), mask)]


def run_text_prompt(
    request: ClickRequest,
    image: Image.Image,
    image_sha256: str,
    detector: Detector | None,
    segmenter: Segmenter,
    cache: EmbeddingCache,
    params: PreannotateParams,
    concept: ConceptSegmenter | None = None,
) -> list[Instance]:
    """A free-text phrase -> detector boxes -> masks (or SAM 3's masks, with ``concept``),
    stored under the request's label."""
    assert request.text is not None
    phrases: Sequence[str] = split_prompt(request.text) or (request.text,)
    return find_instances(image, image_sha256, {request.label: phrases}, detector, segmenter, cache, params, concept)
