"""Fully automatic stage: a point grid -> every confident, stable, distinct mask -> labels.

This is the third stage of the SAM data engine. The mask generation has the meaning and the
defaults of segment-anything's ``SamAutomaticMaskGenerator`` (same parameter names):

1. per crop (the whole image, plus ``crop_n_layers`` layers of 2^i x 2^i overlapping crops),
   a ``points_per_side``^2 grid of single positive clicks, ``points_per_batch`` per decoder
   call, against the cached image embedding (the full image shares the cache entry with
   pre-annotation and clicks);
2. all three candidates of every click; keep those with predicted IoU > ``pred_iou_thresh``
   and stability >= ``stability_score_thresh`` (stability: IoU of the masks thresholded at
   +/- ``stability_score_offset`` around the mask threshold);
3. masks touching a crop edge that is not an image edge are dropped (the object continues
   outside the crop); box NMS at ``box_nms_thresh`` within a crop, then at ``crop_nms_thresh``
   across crops preferring smaller crops (they see more detail);
4. ``min_mask_region_area``: holes and islands below it are removed, then box NMS again,
   preferring masks the cleanup did not change.

One deliberate difference, for CPU cost: stability is computed on the decoder's own
low-resolution logits (SAM: 256x256 over the padded frame, cropped to the image), not on
logits upsampled to the original size. Both thresholds move the same boundary and the ratio
of the two areas barely depends on the resolution it is counted at; only masks that pass
both filters are upsampled, one at a time (upsampling all 3 x 1024 candidates of a 12 MP
image would need tens of gigabytes).

Labelling (the project's labels are the only names Label Studio can store):

* ``stuff`` labels (``LABEL_MODES`` / ``<Label mode="stuff">``, see labeling.py) go through
  CLIPSeg when ``CLIPSEG_MODEL`` is set, in every mode: the heatmap thresholded at the original
  size, optionally refined by SAM from points at the heatmap's peaks;
* an automatic mask takes the label of the detector box it matches best (box IoU between the
  mask's bounding box and the detector box >= ``label_match_iou``). IoU and not containment:
  a wheel inside a car's box is contained in it but is not a car;
* otherwise, with ``CLIP_MODEL`` set, CLIP classifies the mask's crop (pixels outside the mask
  greyed out) against the labels' phrases plus a ``background`` phrase; a label with
  probability >= ``clip_threshold`` is taken;
* otherwise the mask gets ``UNLABELED_LABEL`` when that names one of the project's labels
  (a label outside the config cannot be stored), else it is dropped.

Complement and coverage: automatic masks mostly covered (> ``existing_overlap_thresh`` of
their area) by masks found in this run by the grounded route or CLIPSeg, or, with
``skip_existing_masks``, by masks already in the task (drafts, annotations, predictions of
other model versions), are dropped; the best ``max_detections`` of the rest are kept.
``non_overlapping_masks`` then gives each pixel to one
mask: things before stuff, higher score first (larger area on ties), and a thing mask that
lost more than half of its pixels to better ones is dropped (the panoptic merging rule).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as coco_mask
from torchvision.ops import box_iou, nms

from backend.config import ConfigError, Settings
from backend.embedding_cache import EmbeddingCache, cache_key
from backend.labeling import MASK_TYPES, ProjectConfig
from backend.models.base import (
    Box,
    CandidateSegmenter,
    ConceptSegmenter,
    Detector,
    MaskCandidates,
    PromptSet,
    Segmenter,
    TextHeatmapSegmenter,
    ZeroShotClassifier,
)
from backend.models.clip_classifier import ClipClassifier
from backend.models.clipseg import ClipSegHeatmaps
from backend.models.loading import resolve_device, resolve_dtype
from backend.pipelines.preannotate import (
    PhraseTable,
    PreannotateParams,
    find_instances,
    preannotate_concepts,
    select_detections,
)
from backend.regions import Instance, decode_region_mask, join_split_results, remove_small_regions

log = logging.getLogger(__name__)

PREDICTION_MODES = ("grounded", "everything", "grounded+everything")
BACKGROUND_PHRASE = "background"
CROP_EDGE_TOLERANCE = 20.0  # pixels; segment-anything's tolerance for "touches the crop edge"
MIN_KEPT_FRACTION = 0.5  # non-overlapping coverage: a thing keeping less than this is dropped
_GREY = (128, 128, 128)

CropBox = tuple[int, int, int, int]


def check_mode(mode: object) -> str:
    """``mode`` normalised, or a :class:`ConfigError` listing the valid ones.

    ``mode`` may come from a project's extra params, i.e. any JSON value a user typed
    (``{"prediction_mode": 5}``): a non-string is refused here too, not left to fail later.
    """
    if not isinstance(mode, str):
        raise ConfigError(
            f"prediction_mode must be text, one of {', '.join(PREDICTION_MODES)}; got {mode!r} ({type(mode).__name__})"
        )
    normalised = mode.strip().lower().replace(" ", "")
    if normalised not in PREDICTION_MODES:
        raise ConfigError(f"prediction mode {mode!r} is not one of {', '.join(PREDICTION_MODES)}")
    return normalised


# The defaults of the parameter classes below are the settings' defaults (config.py, mirrored
# by the README's table): one place to change them, and a test's ``EverythingParams()`` means
# the same as an unconfigured server.
_SETTINGS = Settings()


@dataclass(frozen=True)
class EverythingParams:
    """segment-anything's automatic-mask-generator parameters, same names and defaults."""

    points_per_side: int = _SETTINGS.points_per_side
    points_per_batch: int = _SETTINGS.points_per_batch
    pred_iou_thresh: float = _SETTINGS.pred_iou_thresh
    stability_score_thresh: float = _SETTINGS.stability_score_thresh
    stability_score_offset: float = _SETTINGS.stability_score_offset
    box_nms_thresh: float = _SETTINGS.box_nms_thresh
    crop_n_layers: int = _SETTINGS.crop_n_layers
    crop_nms_thresh: float = _SETTINGS.crop_nms_thresh
    crop_overlap_ratio: float = _SETTINGS.crop_overlap_ratio
    crop_n_points_downscale_factor: int = _SETTINGS.crop_n_points_downscale_factor
    min_mask_region_area: int = _SETTINGS.min_mask_region_area

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()} must be >= 1, got {getattr(self, name)}")
        for name in ("crop_n_layers", "min_mask_region_area", "stability_score_offset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.upper()} must be >= 0, got {getattr(self, name)}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name.upper()} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            raise ConfigError(f"CROP_OVERLAP_RATIO must be in [0, 1), got {self.crop_overlap_ratio}")

    @classmethod
    def from_settings(cls, settings: Settings) -> EverythingParams:
        return cls(**{spec.name: getattr(settings, spec.name) for spec in fields(cls)})


@dataclass(frozen=True)
class AutoParams:
    """Everything the modes need beyond pre-annotation's thresholds."""

    everything: EverythingParams = EverythingParams()
    label_match_iou: float = _SETTINGS.label_match_iou
    clip_threshold: float = _SETTINGS.clip_threshold
    unlabeled_label: str = _SETTINGS.unlabeled_label
    clipseg_threshold: float = _SETTINGS.clipseg_threshold
    clipseg_refine_points: int = _SETTINGS.clipseg_refine_points
    skip_existing_masks: bool = _SETTINGS.skip_existing_masks
    existing_overlap_thresh: float = _SETTINGS.existing_overlap_thresh
    non_overlapping_masks: bool = _SETTINGS.non_overlapping_masks

    def __post_init__(self) -> None:
        for name in ("label_match_iou", "clip_threshold", "clipseg_threshold", "existing_overlap_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name.upper()} must be in [0, 1], got {getattr(self, name)}")
        if self.clipseg_refine_points < 0:
            raise ConfigError(f"CLIPSEG_REFINE_POINTS must be >= 0, got {self.clipseg_refine_points}")

    @classmethod
    def from_settings(cls, settings: Settings) -> AutoParams:
        names = [spec.name for spec in fields(cls) if spec.name != "everything"]
        return cls(
            everything=EverythingParams.from_settings(settings),
            **{name: getattr(settings, name) for name in names},
        )


@dataclass
class AutoModels:
    """The optional models of the automatic routes; None where not configured."""

    classifier: ZeroShotClassifier | None = None
    heatmapper: TextHeatmapSegmenter | None = None


def load_auto_models(settings: Settings) -> AutoModels:
    """CLIP and CLIPSeg when ``CLIP_MODEL`` / ``CLIPSEG_MODEL`` name them (nothing otherwise)."""
    stuff = sorted(label for label, mode in settings.label_modes.items() if str(mode).lower() == "stuff")
    if stuff and not settings.clipseg_model:
        raise ConfigError(
            f"LABEL_MODES marks {', '.join(map(repr, stuff))} as stuff, but CLIPSEG_MODEL is empty: "
            "set it (e.g. CIDAS/clipseg-rd64-refined) or drop the stuff entries"
        )
    if not (settings.clip_model or settings.clipseg_model):
        return AutoModels()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return AutoModels(
        classifier=ClipClassifier(settings.clip_model, device, dtype) if settings.clip_model else None,
        heatmapper=ClipSegHeatmaps(settings.clipseg_model, device, dtype) if settings.clipseg_model else None,
    )


# ----------------------------------------------------------------------------- geometry


def point_grid(points_per_side: int) -> np.ndarray:
    """(n^2, 2) points (x, y) in [0, 1]: the centres of an n x n grid of equal cells, row by row."""
    centres = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[CropBox, int]]:
    """(crop box, layer) pairs: the whole image (layer 0), then layer i's 2^i x 2^i crops.

    Neighbouring crops of layer i overlap by ``overlap_ratio`` of the short side x 2 / 2^i,
    so an object cut by one crop's edge lies whole in the next one.
    """
    boxes: list[tuple[CropBox, int]] = [((0, 0, width, height), 0)]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * 2 / per_side)
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        starts_x = [int((crop_w - overlap) * i) for i in range(per_side)]
        starts_y = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0 in starts_x:
            for y0 in starts_y:
                boxes.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer))
    return boxes


def stability_scores(logits: np.ndarray, offset: float, threshold: float = 0.0) -> np.ndarray:
    """(n, h, w) logits -> (n,) IoU of the masks at ``threshold + offset`` and ``- offset``.

    The high-threshold mask lies inside the low one, so the IoU is the ratio of their areas.
    An empty low mask scores 0 (nothing there to be stable). NumPy, not torch: these small
    boolean counts ran 10-100x faster in NumPy here, and they run for every candidate.
    """
    inner = np.count_nonzero(logits > threshold + offset, axis=(1, 2))
    outer = np.count_nonzero(logits > threshold - offset, axis=(1, 2))
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0)


def upsample_logits(logits: torch.Tensor, image_extent: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """One (h, w) logit map whose image part is ``image_extent`` cells -> bool mask of ``size``.

    The whole frame is resized so that the image part becomes exactly ``size`` pixels, then
    cut out: for SAM this is its processor's post-processing (256 -> padded 1024 frame, crop,
    resize) in one bilinear step instead of two.
    """
    rows, cols = logits.shape
    height, width = size
    out_h = max(height, round(height * rows / image_extent[0]))
    out_w = max(width, round(width * cols / image_extent[1]))
    resized = F.interpolate(logits[None, None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
    return (resized[0, 0, :height, :width] > 0).numpy()


def mask_box(mask: np.ndarray) -> Box | None:
    """Tight ``(x0, y0, x1, y1)`` box with exclusive ``x1``/``y1``; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _encode(mask: np.ndarray) -> dict[str, Any]:
    return coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))


# ----------------------------------------------------------------------------- generation


@dataclass
class AutoMask:
    """One automatic mask, stored as COCO RLE of the full image (hundreds of them may be
    alive at once before NMS; full boolean masks of a large image would not fit)."""

    rle: dict[str, Any]
    box: Box
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]  # the click that produced it, image pixels
    crop_box: CropBox

    @property
    def mask(self) -> np.ndarray:
        return coco_mask.decode(self.rle).astype(bool)

    @property
    def area(self) -> int:
        return int(coco_mask.area(self.rle))


def _near_crop_edge(box: Box, crop: CropBox, image: CropBox) -> bool:
    """The box touches an edge of the crop that is not an edge of the image."""
    return any(
        abs(b - c) <= CROP_EDGE_TOLERANCE and abs(b - i) > CROP_EDGE_TOLERANCE
        for b, c, i in zip(box, crop, image, strict=True)
    )


def _keep_by_nms(masks: list[AutoMask], scores: Sequence[float], iou: float) -> list[AutoMask]:
    if len(masks) < 2:
        return masks
    boxes = torch.tensor([m.box for m in masks], dtype=torch.float32)
    keep = nms(boxes, torch.tensor(scores, dtype=torch.float32), iou).tolist()
    return [masks[i] for i in keep]


def _batch_masks(
    points: np.ndarray,
    candidates: Sequence[MaskCandidates],
    crop: CropBox,
    image_size: tuple[int, int],
    params: EverythingParams,
) -> Iterator[AutoMask]:
    """Filter one batch's candidates (predicted IoU, stability, crop edge) into masks."""
    x0, y0, x1, y1 = crop
    height, width = image_size
    for point, found in zip(points, candidates, strict=True):
        logits = np.asarray(found.logits, dtype=np.float32)
        scores = np.asarray(found.scores, dtype=np.float32).reshape(-1)
        keep = scores > params.pred_iou_thresh if params.pred_iou_thresh > 0 else np.ones(len(scores), bool)
        if not keep.any():
            continue
        rows, cols = (math.ceil(extent) for extent in found.image_extent)
        stability = stability_scores(logits[:, :rows, :cols], params.stability_score_offset)
        if params.stability_score_thresh > 0:
            keep &= stability >= params.stability_score_thresh
        for index in np.flatnonzero(keep).tolist():
            local = upsample_logits(torch.from_numpy(logits[index]), found.image_extent, (y1 - y0, x1 - x0))
            local_box = mask_box(local)
            if local_box is None:
                continue
            box = (local_box[0] + x0, local_box[1] + y0, local_box[2] + x0, local_box[3] + y0)
            if _near_crop_edge(box, crop, (0, 0, width, height)):
                continue
            if (x1 - x0, y1 - y0) != (width, height):
                full = np.zeros((height, width), dtype=bool)
                full[y0:y1, x0:x1] = local
                local = full
            yield AutoMask(
                rle=_encode(local),
                box=box,
                predicted_iou=float(scores[index]),
                stability_score=float(stability[index]),
                point=(float(point[0]) + x0, float(point[1]) + y0),
                crop_box=crop,
            )


def _crop_masks(
    image: Image.Image,
    image_sha256: str,
    segmenter: CandidateSegmenter,
    cache: EmbeddingCache,
    crop: CropBox,
    layer: int,
    params: EverythingParams,
) -> list[AutoMask]:
    x0, y0, x1, y1 = crop
    whole = crop == (0, 0, image.width, image.height)
    crop_image = image if whole else image.crop(crop)
    image_key = image_sha256 if whole else f"{image_sha256}@crop{x0},{y0},{x1},{y1}"
    embedding = cache.get_or_compute(cache_key(image_key, segmenter.model_id), lambda: segmenter.embed(crop_image))
    per_side = max(1, int(params.points_per_side / params.crop_n_points_downscale_factor**layer))
    points = point_grid(per_side) * np.array([x1 - x0, y1 - y0], dtype=np.float64)
    found: list[AutoMask] = []
    for start in range(0, len(points), params.points_per_batch):
        batch = points[start : start + params.points_per_batch]
        prompts = [PromptSet(points=[(float(x), float(y))], point_labels=[1]) for x, y in batch]
        candidates = segmenter.segment_candidates(embedding, prompts)
        found.extend(_batch_masks(batch, candidates, crop, (image.height, image.width), params))
    return _keep_by_nms(found, [m.predicted_iou for m in found], params.box_nms_thresh)


def _clean_small_regions(masks: list[AutoMask], params: EverythingParams) -> list[AutoMask]:
    """Holes and islands below ``min_mask_region_area``, then NMS preferring unchanged masks."""
    cleaned: list[AutoMask] = []
    unchanged: list[float] = []
    for auto in masks:
        original = auto.mask
        mask = remove_small_regions(original, params.min_mask_region_area)
        box = mask_box(mask)
        if box is None:
            continue
        same = bool(np.array_equal(mask, original))
        cleaned.append(auto if same else replace(auto, rle=_encode(mask), box=box))
        unchanged.append(1.0 if same else 0.0)
    return _keep_by_nms(cleaned, unchanged, max(params.box_nms_thresh, params.crop_nms_thresh))


def generate_masks(
    image: Image.Image,
    image_sha256: str,
    segmenter: Segmenter,
    cache: EmbeddingCache,
    params: EverythingParams,
) -> list[AutoMask]:
    """Every confident, stable, distinct mask of ``image``, best predicted IoU first."""
    if not isinstance(segmenter, CandidateSegmenter):
        raise ConfigError(
            f"segmenter {segmenter.model_id!r} ({type(segmenter).__name__}) cannot return all of its "
            "candidate masks (segment_candidates), which the everything mode needs; use a SAM-family "
            "segmenter or PREDICTION_MODE=grounded"
        )
    crops = crop_boxes(image.height, image.width, params.crop_n_layers, params.crop_overlap_ratio)
    masks: list[AutoMask] = []
    for crop, layer in crops:
        masks.extend(_crop_masks(image, image_sha256, segmenter, cache, crop, layer, params))
    if len(crops) > 1:
        smaller_first = [1.0 / ((c[2] - c[0]) * (c[3] - c[1])) for c in (m.crop_box for m in masks)]
        masks = _keep_by_nms(masks, smaller_first, params.crop_nms_thresh)
    if params.min_mask_region_area > 0:
        masks = _clean_small_regions(masks, params)
    return sorted(masks, key=lambda m: m.predicted_iou, reverse=True)


# ----------------------------------------------------------------------------- labelling


def label_by_boxes(
    boxes: Sequence[Box], detections: Sequence[tuple[Box, float, str]], min_iou: float
) -> list[tuple[str, float] | None]:
    """Per mask box: (label, detector score) of the detector box it overlaps best, when that
    box IoU is at least ``min_iou``; else None."""
    if not boxes or not detections:
        return [None] * len(boxes)
    ious = box_iou(
        torch.tensor(list(boxes), dtype=torch.float32),
        torch.tensor([box for box, _, _ in detections], dtype=torch.float32),
    )
    best_iou, best = ious.max(dim=1)
    return [
        (detections[j][2], detections[j][1]) if iou >= min_iou else None
        for iou, j in zip(best_iou.tolist(), best.tolist(), strict=True)
    ]


def mask_crop(image: Image.Image, mask: np.ndarray, box: Box) -> Image.Image:
    """The mask's bounding box of ``image``, pixels outside the mask grey: CLIP then judges
    the object, not its surroundings."""
    x0, y0, x1, y1 = (int(v) for v in box)
    pixels = np.array(image.crop((x0, y0, x1, y1)).convert("RGB"))
    pixels[~mask[y0:y1, x0:x1]] = _GREY
    return Image.fromarray(pixels)


def label_by_clip(
    crops: Sequence[Image.Image],
    prompts_by_label: Mapping[str, Sequence[str]],
    classifier: ZeroShotClassifier,
    threshold: float,
) -> list[tuple[str, float] | None]:
    """Per crop: (label, probability) of the most probable label when it reaches ``threshold``.

    The softmax runs over every phrase of every label plus :data:`BACKGROUND_PHRASE`, and a
    label's probability is the sum over its phrases: without the background alternative a
    project with one label would give every crop probability 1.
    """
    table = PhraseTable.from_labels(prompts_by_label)
    if not crops or not table.phrases:
        return [None] * len(crops)
    probs = classifier.classify(crops, [*table.phrases, BACKGROUND_PHRASE])
    labels = list(dict.fromkeys(table.labels))
    per_label = np.stack(
        [probs[:, [i for i, owner in enumerate(table.labels) if owner == label]].sum(axis=1) for label in labels],
        axis=1,
    )
    best = per_label.argmax(axis=1)
    return [
        (labels[j], float(per_label[row, j])) if per_label[row, j] >= threshold else None for row, j in enumerate(best)
    ]


def label_masks(
    image: Image.Image,
    masks: Sequence[AutoMask],
    prompts_by_label: Mapping[str, Sequence[str]],
    detections: Sequence[tuple[Box, float, str]],
    classifier: ZeroShotClassifier | None,
    params: AutoParams,
    project_labels: Sequence[str],
) -> list[Instance]:
    """Instances for the masks a label claims (detector agreement, then CLIP, then the
    catch-all label); score = predicted IoU (clipped to [0, 1]) x the label's confidence."""
    labels = label_by_boxes([m.box for m in masks], detections, params.label_match_iou)
    decoded: dict[int, np.ndarray] = {}  # RLE -> mask once, and only for masks that need it

    def mask_of(index: int) -> np.ndarray:
        if index not in decoded:
            decoded[index] = masks[index].mask
        return decoded[index]

    if classifier is not None:
        rgb = image.convert("RGB")
        open_rows = [i for i, found in enumerate(labels) if found is None]
        crops = [mask_crop(rgb, mask_of(i), masks[i].box) for i in open_rows]
        for i, found in zip(
            open_rows, label_by_clip(crops, prompts_by_label, classifier, params.clip_threshold), strict=True
        ):
            labels[i] = found
    fallback = params.unlabeled_label if params.unlabeled_label in project_labels else ""
    if params.unlabeled_label and not fallback:
        log.debug(
            "UNLABELED_LABEL %r is not a label of this project: unlabelled masks dropped",
            params.unlabeled_label,
        )
    instances: list[Instance] = []
    for index, (auto, found) in enumerate(zip(masks, labels, strict=True)):
        quality = float(min(max(auto.predicted_iou, 0.0), 1.0))
        if found is not None:
            instances.append(Instance(found[0], quality * found[1], auto.box, mask_of(index)))
        elif fallback:
            instances.append(Instance(fallback, quality, auto.box, mask_of(index)))
    return instances


# ----------------------------------------------------------------------------- stuff (CLIPSeg)


def heatmap_points(heat: np.ndarray, mask: np.ndarray, count: int) -> list[tuple[float, float]]:
    """Up to ``count`` click points inside ``mask`` at the heatmap's peaks, spread out: each
    pick blanks a disk of radius sqrt(area / count) / 2 around it, so the points cover the
    region instead of piling up on its single hottest spot."""
    remaining = np.where(mask, heat, -np.inf)
    radius = math.sqrt(int(mask.sum()) / max(count, 1)) / 2
    ys, xs = np.ogrid[: heat.shape[0], : heat.shape[1]]
    points: list[tuple[float, float]] = []
    for _ in range(count):
        flat = int(np.argmax(remaining))
        y, x = divmod(flat, heat.shape[1])
        if not np.isfinite(remaining[y, x]):
            break
        points.append((x + 0.5, y + 0.5))
        remaining[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = -np.inf
    return points


def segment_stuff(
    image: Image.Image,
    image_sha256: str,
    prompts_by_label: Mapping[str, Sequence[str]],
    heatmapper: TextHeatmapSegmenter,
    params: AutoParams,
    min_region_area: int = 0,
    segmenter: Segmenter | None = None,
    cache: EmbeddingCache | None = None,
) -> list[Instance]:
    """One mask per stuff label: its phrases' heatmaps (pixel-wise max) > ``clipseg_threshold``.

    Score = mean probability inside the mask. With ``clipseg_refine_points`` and a segmenter,
    SAM redraws the mask from that many peak points plus the heatmap mask as its mask prompt,
    and the score is multiplied by SAM's predicted IoU.
    """
    table = PhraseTable.from_labels(prompts_by_label)
    if not table.phrases:
        return []
    heat_by_phrase = heatmapper.heatmaps(image, table.phrases)
    instances: list[Instance] = []
    for label in dict.fromkeys(table.labels):
        heat = heat_by_phrase[[i for i, owner in enumerate(table.labels) if owner == label]].max(axis=0)
        mask = heat > params.clipseg_threshold
        if min_region_area > 0:
            mask = remove_small_regions(mask, min_region_area)
        if not mask.any():
            continue
        score = float(heat[mask].mean())
        if params.clipseg_refine_points > 0 and segmenter is not None and cache is not None:
            points = heatmap_points(heat, mask, params.clipseg_refine_points)
            embedding = cache.get_or_compute(
                cache_key(image_sha256, segmenter.model_id), lambda: segmenter.embed(image)
            )
            refined = segmenter.segment(
                embedding, [PromptSet(points=points, point_labels=[1] * len(points), prior_mask=mask)]
            )[0]
            if refined.mask.any():
                mask = refined.mask
                score *= float(min(max(refined.score, 0.0), 1.0))
        box = mask_box(mask)
        assert box is not None  # mask.any() checked above
        instances.append(Instance(label, score, box, mask))
    return instances


# ----------------------------------------------------------------------------- complement / coverage


def existing_masks(task: Mapping[str, Any], width: int, height: int, own_version: str) -> list[np.ndarray]:
    """Masks of the task's drafts, annotations and predictions of other model versions.

    Predictions carrying ``own_version`` are this backend's own earlier answer for the same
    settings: counting them would make a re-run suppress everything it found before.
    """
    found: list[np.ndarray] = []
    for key in ("drafts", "annotations", "predictions"):
        entries = task.get(key)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("result"), list):
                continue
            if key == "predictions" and entry.get("model_version") == own_version:
                continue
            for region in join_split_results(entry["result"]):
                if not isinstance(region, Mapping) or str(region.get("type", "")).lower() not in MASK_TYPES:
                    continue
                if (region.get("original_width"), region.get("original_height")) != (width, height):
                    continue
                try:
                    found.append(decode_region_mask(dict(region)))
                except ValueError as exc:
                    log.debug("task %s: existing region skipped: %s", task.get("id"), exc)
    return found


def drop_covered(instances: Sequence[Instance], covered: np.ndarray, threshold: float) -> list[Instance]:
    """Instances whose mask is covered by ``covered`` on more than ``threshold`` of its area
    are dropped (what is already segmented is not proposed again)."""
    if not covered.any():
        return list(instances)
    kept = []
    for inst in instances:
        if inst.mask is None:
            kept.append(inst)
            continue
        area = int(inst.mask.sum())
        if area and np.logical_and(inst.mask, covered).sum() / area > threshold:
            continue
        kept.append(inst)
    return kept


def make_non_overlapping(instances: Sequence[Instance], stuff_labels: frozenset[str] = frozenset()) -> list[Instance]:
    """Each pixel in at most one mask: things before stuff, higher score first, larger area
    on ties; a thing keeping less than :data:`MIN_KEPT_FRACTION` of its pixels is dropped,
    stuff keeps whatever is left (it is the filler between things)."""
    masked = [inst for inst in instances if inst.mask is not None]
    if not masked:
        return list(instances)
    areas = {id(inst): int(inst.mask.sum()) for inst in masked}
    order = sorted(masked, key=lambda inst: (inst.label in stuff_labels, -inst.score, -areas[id(inst)]))
    taken = np.zeros_like(masked[0].mask, dtype=bool)
    kept: list[Instance] = [inst for inst in instances if inst.mask is None]
    for inst in order:
        free = np.logical_and(inst.mask, ~taken)
        left = int(free.sum())
        if left == 0 or (inst.label not in stuff_labels and left < MIN_KEPT_FRACTION * areas[id(inst)]):
            continue
        taken |= free
        box = mask_box(free)
        assert box is not None  # left > 0
        kept.append(replace(inst, mask=free, box=box))
    return kept


# ----------------------------------------------------------------------------- modes


def _detections(
    image: Image.Image,
    image_sha256: str,
    prompts_by_label: Mapping[str, Sequence[str]],
    detector: Detector | None,
    cache: EmbeddingCache,
    params: PreannotateParams,
    concept: ConceptSegmenter | None,
) -> list[tuple[Box, float, str]]:
    """The detector's selected boxes for the labels, as pre-annotation selects them; on the
    SAM 3 route the concept model's instances (no detector is loaded there)."""
    if concept is not None:
        found = preannotate_concepts(image, image_sha256, prompts_by_label, concept, cache, params)
        return [(inst.box, inst.score, inst.label) for inst in found]
    assert detector is not None  # the grounded route always loads one
    table = PhraseTable.from_labels(prompts_by_label)
    if not table.phrases:
        return []
    lowest = min([params.box_threshold, *params.label_thresholds.values()])
    detections = detector.detect(image, table.phrases, lowest, params.text_threshold)
    return [(det.box, det.score, label) for det, label in select_detections(detections, table, params)]


def predict_instances(
    mode: str,
    image: Image.Image,
    image_sha256: str,
    task: Mapping[str, Any],
    project: ProjectConfig,
    detector: Detector | None,
    segmenter: Segmenter,
    cache: EmbeddingCache,
    models: AutoModels,
    pre_params: PreannotateParams,
    params: AutoParams,
    own_version: str,
    concept: ConceptSegmenter | None = None,
    on_unmatched: Callable[[int], None] | None = None,
) -> list[Instance]:
    """All instances of one image under ``mode`` (see the module docstring for the rules);
    ``concept`` (the SAM 3 route) takes the detector's place for the labels' instances;
    ``on_unmatched`` counts the detector's boxes that matched no label phrase."""
    mode = check_mode(mode)
    prompts = project.prompts_by_label()
    stuff = project.stuff_labels() if models.heatmapper is not None else frozenset()
    things = {label: phrases for label, phrases in prompts.items() if label not in stuff}
    instances: list[Instance] = []
    if stuff and models.heatmapper is not None:
        instances += segment_stuff(
            image,
            image_sha256,
            {label: prompts[label] for label in prompts if label in stuff},
            models.heatmapper,
            params,
            pre_params.min_region_area,
            segmenter,
            cache,
        )
    if mode != "everything" and things:
        instances += find_instances(
            image, image_sha256, things, detector, segmenter, cache, pre_params, concept, on_unmatched
        )
    if mode != "grounded":
        automatic = generate_masks(image, image_sha256, segmenter, cache, params.everything)
        # in grounded+everything the grounded masks already carry the detector's labels, and
        # the automatic masks they cover are dropped below: detecting again would add nothing
        detections = (
            _detections(image, image_sha256, things, detector, cache, pre_params, concept)
            if mode == "everything"
            else []
        )
        labelled = label_masks(image, automatic, things, detections, models.classifier, params, project.label_values())
        covering = [inst.mask for inst in instances if inst.mask is not None]
        if params.skip_existing_masks:
            covering += existing_masks(task, image.width, image.height, own_version)
        covered = np.zeros((image.height, image.width), dtype=bool)
        for mask in covering:
            covered |= mask
        labelled = drop_covered(labelled, covered, params.existing_overlap_thresh)
        instances += sorted(labelled, key=lambda inst: inst.score, reverse=True)[: pre_params.max_detections]
    if params.non_overlapping_masks:
        instances = make_non_overlapping(instances, stuff)
    return instances
