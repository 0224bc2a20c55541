"""Model id or path -> adapter, in one place.

The adapter is chosen from what the model *is* (config.json ``model_type``, or a ``.pth``
file), never from how its id is spelled, so a renamed local folder or a fine-tuned hub copy
loads with the right classes. Every failure is a :class:`ModelLoadError` naming the id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from backend.config import Settings
from backend.models import grounding_dino, sam
from backend.models.base import Detector, Segmenter
from backend.models.grounding_dino import GroundingDinoDetector
from backend.models.loading import ModelLoadError, load_pretrained, resolve_device, resolve_dtype
from backend.models.owlv2 import Owlv2Detector
from backend.models.sam import SamSegmenter
from backend.models.sam_checkpoint import SamCheckpointSegmenter

logger = logging.getLogger(__name__)

DETECTOR_MODEL_TYPES: tuple[str, ...] = (*grounding_dino.SUPPORTED_MODEL_TYPES, "owlv2")
SEGMENTER_MODEL_TYPES: tuple[str, ...] = sam.SUPPORTED_MODEL_TYPES
CHECKPOINT_SUFFIXES = (".pth", ".pt")


@dataclass
class ModelBundle:
    """The loaded models and how long each took (for logs, /health and the load metric)."""

    detector: Detector
    segmenter: Segmenter
    load_seconds: dict[str, float] = field(default_factory=dict)

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
        return GroundingDinoDetector(model_id, device=device, dtype=dtype)
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


def load_models(settings: Settings) -> ModelBundle:
    """Load detector and segmenter, timing each; the first failure propagates (a backend
    without either model cannot serve its main route)."""
    seconds: dict[str, float] = {}
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
