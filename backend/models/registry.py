"""Model id or path -> adapter, in one place.

The adapter is chosen from what the model *is* (config.json ``model_type``, or a ``.pth``
file), never from how its id is spelled, so a renamed local folder or a fine-tuned hub copy
loads with the right classes. Every failure is a :class:`ModelLoadError` naming the id.

Two pre-annotation routes (``PIPELINE``): ``grounded-sam`` (a text detector's boxes, then a
segmenter's masks) and ``sam3`` (SAM 3's concept model gives masks from text directly; its
click tracker, sharing the concept model's ViT, is the segmenter). ``auto`` takes ``sam3``
when ``SEGMENTER_MODEL`` is a SAM 3 checkpoint with its detector.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from backend.config import ConfigError, Settings
from backend.embedding_cache import EmbeddingCache
from backend.models import grounding_dino, sam
from backend.models.base import ConceptSegmenter, Detector, Segmenter
from backend.models.grounding_dino import GroundingDinoDetector
from backend.models.loading import (
    ModelLoadError,
    apply_torch_threads,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)
from backend.models.owlv2 import Owlv2Detector
from backend.models.sam import SamSegmenter
from backend.models.sam3 import SAM3_MODEL_TYPES, Sam3ConceptSegmenter, Sam3SharedTrackerSegmenter
from backend.models.sam_checkpoint import SamCheckpointSegmenter

logger = logging.getLogger(__name__)

DETECTOR_MODEL_TYPES: tuple[str, ...] = (*grounding_dino.SUPPORTED_MODEL_TYPES, "owlv2")
SEGMENTER_MODEL_TYPES: tuple[str, ...] = sam.SUPPORTED_MODEL_TYPES
CHECKPOINT_SUFFIXES = (".pth", ".pt")
GROUNDED_SAM = "grounded-sam"
SAM3 = "sam3"
PIPELINES = (GROUNDED_SAM, SAM3)


@dataclass
class ModelBundle:
    """The loaded models and how long each took (for logs, /health and the load metric).

    On the ``sam3`` route ``concept_segmenter`` finds the instances, no detector is loaded
    (``detector`` is None) and ``segmenter`` is SAM 3's tracker on the concept model's ViT.
    """

    detector: Detector | None
    segmenter: Segmenter
    load_seconds: dict[str, float] = field(default_factory=dict)
    concept_segmenter: ConceptSegmenter | None = None
    pipeline: str = GROUNDED_SAM

    @property
    def total_load_seconds(self) -> float:
        return sum(self.load_seconds.values())


def _model_type(model_id: str, role: str) -> str:
    return load_pretrained(AutoConfig, model_id, what=f"{role} config").model_type


def load_detector(settings: Settings) -> Detector:
    """``settings.detector_model`` as a GroundingDINO / MM-GroundingDINO / OWLv2 detector."""
    model_id = settings.detector_model
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model_type = _model_type(model_id, "detector")
    if model_type in grounding_dino.SUPPORTED_MODEL_TYPES:
        return GroundingDinoDetector(model_id, device=device, dtype=dtype, max_size=settings.detector_max_size or None)
    if model_type == "owlv2":
        return Owlv2Detector(model_id, device=device, dtype=dtype)
    raise ModelLoadError(
        f"DETECTOR_MODEL={model_id!r} is a {model_type!r} model; supported detectors: {', '.join(DETECTOR_MODEL_TYPES)}"
    )


def load_segmenter(settings: Settings) -> Segmenter:
    """``settings.segmenter_model`` as a segmenter: a ``.pth`` file is an official
    segment-anything checkpoint, anything else a transformers id/folder of the SAM family."""
    model_id = settings.segmenter_model
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    batch_size = settings.segmenter_batch_size
    if Path(model_id).suffix.lower() in CHECKPOINT_SUFFIXES:
        return SamCheckpointSegmenter(model_id, device=device, dtype=dtype, max_batch_size=batch_size)
    model_type = _model_type(model_id, "segmenter")
    if model_type not in SEGMENTER_MODEL_TYPES:
        raise ModelLoadError(
            f"SEGMENTER_MODEL={model_id!r} is a {model_type!r} model; supported segmenters: "
            f"{', '.join(SEGMENTER_MODEL_TYPES)} or a segment-anything .pth checkpoint"
        )
    return SamSegmenter(model_id, device=device, dtype=dtype, max_batch_size=batch_size, model_type=model_type)


def resolve_pipeline(settings: Settings) -> str:
    """``PIPELINE``, with ``auto`` resolved from what ``SEGMENTER_MODEL`` is: ``sam3`` for a
    SAM 3 checkpoint holding its detector (``model_type`` sam3 / sam3_video), else
    ``grounded-sam`` (a SAM 3 *tracker* checkpoint stays a click segmenter for GroundingDINO)."""
    choice = settings.pipeline.strip().lower()
    if choice in PIPELINES:
        return choice
    if choice != "auto":
        raise ConfigError(f"PIPELINE={settings.pipeline!r} is not one of auto, {', '.join(PIPELINES)}")
    if Path(settings.segmenter_model).suffix.lower() in CHECKPOINT_SUFFIXES:
        return GROUNDED_SAM
    return SAM3 if _model_type(settings.segmenter_model, "segmenter") in SAM3_MODEL_TYPES else GROUNDED_SAM


def load_sam3(settings: Settings, cache: EmbeddingCache) -> tuple[Sam3ConceptSegmenter, Sam3SharedTrackerSegmenter]:
    """SAM 3's concept model and its click tracker from one ``SEGMENTER_MODEL`` checkpoint in
    the hub layout (``sam3_video``, e.g. facebook/sam3), the tracker reading the concept model's
    cached ViT output from ``cache`` (the predictor's). Loading the tracker reads the ViT
    weights a second time; that copy is dropped as soon as the module is shared."""
    model_id = settings.segmenter_model
    model_type = _model_type(model_id, "segmenter")
    if model_type not in SAM3_MODEL_TYPES:
        raise ModelLoadError(
            f"PIPELINE=sam3 needs SEGMENTER_MODEL to be a SAM 3 checkpoint (e.g. facebook/sam3); "
            f"{model_id!r} is a {model_type!r} model"
        )
    if model_type == "sam3":
        raise ModelLoadError(
            f"{model_id!r} holds SAM 3's image detector alone (model_type sam3), without the click "
            "tracker the sam3 route also needs: use the full checkpoint (facebook/sam3, model_type "
            "sam3_video), or PIPELINE=grounded-sam"
        )
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    concept = Sam3ConceptSegmenter(model_id, device=device, dtype=dtype)
    tracker = Sam3SharedTrackerSegmenter(
        model_id,
        concept,
        cache,
        device=device,
        dtype=dtype,
        max_batch_size=settings.segmenter_batch_size,
        model_type=model_type,
    )
    return concept, tracker


def load_models(settings: Settings, cache: EmbeddingCache | None = None) -> ModelBundle:
    """Load the models of the configured route, timing each; the first failure propagates (a
    backend without them cannot serve its main route). ``cache`` is the predictor's embedding
    cache: the ``sam3`` route needs it (its click segmenter reads image features from it).
    ``TORCH_THREADS`` is applied first, so the threads that later serve requests inherit it."""
    apply_torch_threads(settings.torch_threads)
    seconds: dict[str, float] = {}
    if resolve_pipeline(settings) == SAM3:
        if cache is None:
            raise ValueError("the sam3 route needs the predictor's embedding cache to share image features")
        start = time.perf_counter()
        concept, tracker = load_sam3(settings, cache)
        seconds["concept_segmenter"] = time.perf_counter() - start
        logger.info("models loaded: SAM 3 %s (%.1f s)", settings.segmenter_model, seconds["concept_segmenter"])
        return ModelBundle(None, tracker, seconds, concept_segmenter=concept, pipeline=SAM3)
    start = time.perf_counter()
    detector = load_detector(settings)
    seconds["detector"] = time.perf_counter() - start
    start = time.perf_counter()
    segmenter = load_segmenter(settings)
    seconds["segmenter"] = time.perf_counter() - start
    logger.info(
        "models loaded: detector %s (%.1f s), segmenter %s (%.1f s)",
        settings.detector_model,
        seconds["detector"],
        settings.segmenter_model,
        seconds["segmenter"],
    )
    return ModelBundle(detector=detector, segmenter=segmenter, load_seconds=seconds)
