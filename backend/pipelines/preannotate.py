"""Semi-automatic stage: the project's label names -> boxes -> one mask per box.

Order of work per image, chosen so each model runs once:
1. all phrases of all labels go to the detector in one call (the adapter packs them into
   as few captions as its text encoder allows);
2. per-label box thresholds, class-aware NMS, then removal of near-identical boxes that
   two labels both claimed (the higher score keeps it), then a cap on the count;
3. the segmenter's image embedding comes from the shared cache (computed once per image
   and model, reused by later clicks), and every box goes to the decoder in one batched call;
4. optional island/hole cleanup and mask-IoU suppression across labels.

Region score = detector score x the segmenter's predicted IoU (clipped to [0, 1]): a box
the detector is sure of but whose mask SAM doubts ranks below one both agree on.

The SAM 3 route (:func:`preannotate_concepts`) replaces steps 1 and 3 with one concept
model: its image features come from the cache, one pass per phrase returns masks, boxes and
scores (detection x presence), and steps 2 and 4 are the same code with the same settings, so
both routes threshold, deduplicate and clean up alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_iou

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache, cache_key
from backend.models.base import ConceptSegmenter, Detection, Detector, PromptSet, Segmenter
from backend.regions import Instance, remove_small_regions

log = logging.getLogger(__name__)

# Defaults are the settings' own (config.py): one place to change them.
_SETTINGS = Settings()


@dataclass(frozen=True)
class PreannotateParams:
    """Thresholds of one pre-annotation run (environment defaults, per-project overrides)."""

    box_threshold: float = _SETTINGS.box_threshold
    text_threshold: float = _SETTINGS.text_threshold
    label_thresholds: Mapping[str, float] = field(default_factory=dict)
    nms_iou: float = _SETTINGS.nms_iou
    cross_label_iou: float = _SETTINGS.cross_label_iou
    mask_nms_iou: float = _SETTINGS.mask_nms_iou
    min_region_area: int = _SETTINGS.min_region_area
    max_detections: int = _SETTINGS.max_detections
    # False when the project draws no masks (only RectangleLabels): the detector's boxes are
    # the answer, and SAM's encoder (seconds per image on CPU) and decoder are skipped
    segment_boxes: bool = True


@dataclass(frozen=True)
class PhraseTable:
    """Detector phrases and the label each one stands for.

    A phrase shared by two labels is sent once and stored under the first label in config
    order (sending it twice would only produce duplicate boxes for NMS to fight over).
    """

    phrases: tuple[str, ...]
    labels: tuple[str, ...]  # labels[i] is the label of phrases[i]

    @classmethod
    def from_labels(cls, prompts_by_label: Mapping[str, Sequence[str]]) -> PhraseTable:
        phrases: list[str] = []
        labels: list[str] = []
        seen: set[str] = set()
        for label, prompts in prompts_by_label.items():
            for phrase in prompts:
                key = phrase.strip().lower()
                if key and key not in seen:
                    seen.add(key)
                    phrases.append(phrase.strip())
                    labels.append(label)
        return cls(tuple(phrases), tuple(labels))


def _threshold_for(label: str, params: PreannotateParams) -> float:
    return float(params.label_thresholds.get(label, params.box_threshold))


def lowest_threshold(params: PreannotateParams) -> float:
    """The score a model is asked to report down to: the lowest of the default and the
    per-label thresholds (each label's own is applied afterwards by :func:`select_detections`)."""
    return min([params.box_threshold, *params.label_thresholds.values()])


def select_detections(
    detections: Sequence[Detection], table: PhraseTable, params: PreannotateParams
) -> list[tuple[Detection, str]]:
    """Per-label thresholds, class-aware NMS, cross-label duplicate removal, count cap.

    Returns (detection, label) pairs sorted by score, best first.
    """
    kept = [
        (det, table.labels[det.prompt_index])
        for det in detections
        if 0 <= det.prompt_index < len(table.labels)
        and det.score >= _threshold_for(table.labels[det.prompt_index], params)
    ]
    if not kept:
        return []
    boxes = torch.tensor([det.box for det, _ in kept], dtype=torch.float32)
    scores = torch.tensor([det.score for det, _ in kept], dtype=torch.float32)
    label_ids = {label: i for i, label in enumerate(dict.fromkeys(label for _, label in kept))}
    groups = torch.tensor([label_ids[label] for _, label in kept])
    order = batched_nms(boxes, scores, groups, params.nms_iou).tolist()  # sorted by score

    ious = box_iou(boxes[order], boxes[order])
    kept_ranks: list[int] = []
    for rank in range(len(order)):
        if kept_ranks and bool((ious[rank, kept_ranks] > params.cross_label_iou).any()):
            continue
        kept_ranks.append(rank)
    return [kept[order[rank]] for rank in kept_ranks[: params.max_detections]]


def suppress_overlapping_masks(instances: list[Instance], iou_threshold: float) -> list[Instance]:
    """Greedy mask-IoU suppression across labels, best score first (0 disables)."""
    if iou_threshold <= 0 or len(instances) < 2:
        return instances
    ordered = sorted(instances, key=lambda inst: inst.score, reverse=True)
    kept: list[Instance] = []
    kept_masks: list[np.ndarray] = []
    for inst in ordered:
        if inst.mask is None:
            kept.append(inst)
            continue
        area = int(inst.mask.sum())
        duplicate = False
        for other in kept_masks:
            inter = int(np.logical_and(inst.mask, other).sum())
            union = area + int(other.sum()) - inter
            if union and inter / union > iou_threshold:
                duplicate = True
                break
        if not duplicate:
            kept.append(inst)
            kept_masks.append(inst.mask)
    return kept


def preannotate(
    image: Image.Image,
    image_sha256: str,
    prompts_by_label: Mapping[str, Sequence[str]],
    detector: Detector,
    segmenter: Segmenter,
    cache: EmbeddingCache,
    params: PreannotateParams,
    on_unmatched: Callable[[int], None] | None = None,
) -> list[Instance]:
    """Find every label's instances in ``image`` and segment them.

    ``on_unmatched`` receives the number of confident boxes whose text matched no label
    phrase (dropped, never given a default label), when the detector reports it.
    """
    table = PhraseTable.from_labels(prompts_by_label)
    if not table.phrases:
        return []
    lowest = lowest_threshold(params)
    with_stats = getattr(detector, "detect_with_stats", None)
    if with_stats is not None:
        detections, stats = with_stats(image, table.phrases, lowest, params.text_threshold)
        if stats.unmatched:
            log.info("%d confident boxes matched no label phrase and were dropped", stats.unmatched)
            if on_unmatched is not None:
                on_unmatched(stats.unmatched)
    else:
        detections = detector.detect(image, table.phrases, lowest, params.text_threshold)
    selected = select_detections(detections, table, params)
    if not selected:
        return []
    if not params.segment_boxes:
        return finish_instances((Instance(label, det.score, det.box, None) for det, label in selected), params)
    embedding = cache.get_or_compute(
        cache_key(image_sha256, segmenter.model_id), lambda: segmenter.embed(image)
    )
    predictions = segmenter.segment(embedding, [PromptSet(box=det.box) for det, _ in selected])
    return finish_instances(
        (
            Instance(label=label, score=det.score * float(min(max(pred.score, 0.0), 1.0)), box=det.box, mask=pred.mask)
            for (det, label), pred in zip(selected, predictions, strict=True)
        ),
        params,
    )


def preannotate_concepts(
    image: Image.Image,
    image_sha256: str,
    prompts_by_label: Mapping[str, Sequence[str]],
    concept: ConceptSegmenter,
    cache: EmbeddingCache,
    params: PreannotateParams,
) -> list[Instance]:
    """The SAM 3 route of :func:`preannotate`: one concept pass per phrase on image features
    computed once per image (the cache entry is shared with later text prompts and with SAM 3's
    click tracker), each instance stored under its phrase's label.

    SAM 3's score (detection x presence) takes the place of the detector score in the per-label
    thresholds, NMS and cross-label deduplication of :func:`select_detections`.
    """
    table = PhraseTable.from_labels(prompts_by_label)
    if not table.phrases:
        return []
    embedding = cache.get_or_compute(cache_key(image_sha256, concept.model_id), lambda: concept.embed(image))
    found = concept.segment_concepts(embedding, table.phrases, lowest_threshold(params), params.max_detections)
    by_detection = {Detection(inst.box, inst.score, inst.prompt_index): inst for inst in found}
    selected = select_detections(list(by_detection), table, params)
    return finish_instances(  # full-size masks only for the selected instances, one at a time
        (
            Instance(label=label, score=det.score, box=det.box, mask=by_detection[det].full_mask())
            for det, label in selected
        ),
        params,
    )


def find_instances(
    image: Image.Image,
    image_sha256: str,
    prompts_by_label: Mapping[str, Sequence[str]],
    detector: Detector | None,
    segmenter: Segmenter,
    cache: EmbeddingCache,
    params: PreannotateParams,
    concept: ConceptSegmenter | None = None,
    on_unmatched: Callable[[int], None] | None = None,
) -> list[Instance]:
    """The labels' instances on the configured route: the concept segmenter's when there is
    one (``PIPELINE=sam3``), else the detector's boxes segmented by ``segmenter``
    (``on_unmatched`` as in :func:`preannotate`)."""
    if concept is not None:
        return preannotate_concepts(image, image_sha256, prompts_by_label, concept, cache, params)
    if detector is None:
        raise ValueError("the grounded route needs a detector (none was loaded)")
    return preannotate(image, image_sha256, prompts_by_label, detector, segmenter, cache, params, on_unmatched)


def finish_instances(instances: Iterable[Instance], params: PreannotateParams) -> list[Instance]:
    """What every route does once it has masks: islands and holes below ``min_region_area``
    removed, masks left empty dropped, then mask-IoU suppression across labels."""
    kept: list[Instance] = []
    for instance in instances:
        mask = instance.mask
        if mask is not None and params.min_region_area > 0:
            mask = remove_small_regions(mask, params.min_region_area)
        if mask is not None and not mask.any():
            continue
        kept.append(replace(instance, mask=mask))
    return suppress_overlapping_masks(kept, params.mask_nms_iou)
