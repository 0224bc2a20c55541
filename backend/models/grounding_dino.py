"""GroundingDINO and MM-GroundingDINO through transformers, behind the ``Detector`` interface.

Both families share the processor (BERT tokenizer + DETR-style image processor) and the
output layout: per query a box and one logit per caption token. Labels are attached by
token spans (:mod:`backend.models.captions`), never by decoding the tokens back to text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor
from transformers.image_transforms import center_to_corners_format

from backend.models.base import Detection
from backend.models.captions import Caption, assign_phrases, build_captions
from backend.models.loading import (
    ModelLoadError,
    inference_context,
    load_pretrained,
    resolve_device,
)

SUPPORTED_MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")


@dataclass(frozen=True)
class DetectionStats:
    """What one ``detect`` call did, for logs and metrics.

    ``unmatched`` counts queries whose box score passed ``box_threshold`` but whose best
    phrase stayed below ``text_threshold``: boxes the model is sure of but cannot name. Many
    of them suggest a too-high text threshold or prompts the model does not understand.
    """

    forwards: int = 0
    above_box_threshold: int = 0
    unmatched: int = 0


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, 4) pixel xyxy boxes clipped to the image; a copy, as float32."""
    boxes = boxes.float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def boxes_to_pixels(boxes_cxcywh: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalized (cx, cy, w, h) -> pixel (x0, y0, x1, y1), clipped to the image."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return clip_boxes(center_to_corners_format(boxes_cxcywh.float()) * scale, width, height)


class GroundingDinoDetector:
    """Text prompts -> boxes with a GroundingDINO-family model (HF id or local directory).

    ``device``: "auto", "cpu", "cuda", "cuda:N". ``dtype``: compute dtype (float32 weights,
    autocast to bfloat16/float16 otherwise; see :mod:`backend.models.loading`).
    ``shortest_edge``/``longest_edge`` override the processor's resize (800/1333 for the
    released models): the forward cost grows with pixels, and at 480x640 it is about 4x
    cheaper on CPU than at 800x1333, for some loss on small objects. ``max_size`` caps both
    (``DETECTOR_MAX_SIZE``): the longest edge at most ``max_size``, and never a larger image
    than the processor's own size would give.

    One forward per caption; all prompts share a caption while they fit the text encoder's
    ``max_text_len`` tokens. Thread-safe: tokenization and the forward run under a lock (one
    model, one forward at a time; torch already uses all cores for it).
    """

    def __init__(
        self,
        model_id: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        shortest_edge: int | None = None,
        longest_edge: int | None = None,
        max_size: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = dtype
        config = load_pretrained(AutoConfig, model_id, what="detector config")
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"detector {model_id!r} is a {config.model_type!r} model; GroundingDinoDetector loads "
                f"{' or '.join(SUPPORTED_MODEL_TYPES)} (use Owlv2Detector for OWLv2)"
            )
        self.processor = load_pretrained(AutoProcessor, model_id, what="detector processor")
        self.model = load_pretrained(
            AutoModelForZeroShotObjectDetection, model_id, what="detector", config=config
        )
        self.model.to(self.device).eval()
        self.max_text_len: int = config.max_text_len
        size = dict(self.processor.image_processor.size)
        if shortest_edge is not None:
            size["shortest_edge"] = shortest_edge
        if longest_edge is not None:
            size["longest_edge"] = longest_edge
        if max_size is not None:
            if max_size < 1:
                raise ValueError(f"DETECTOR_MAX_SIZE must be a positive number of pixels, got {max_size}")
            size["longest_edge"] = min(size["longest_edge"], max_size)
            size["shortest_edge"] = min(size["shortest_edge"], max_size)
        self.image_size = size
        self._lock = threading.Lock()

    def captions(self, prompts: Sequence[str]) -> list[Caption]:
        """The captions ``detect`` runs for ``prompts`` (one forward each)."""
        return build_captions(prompts, self.processor.tokenizer, self.max_text_len)

    def detect(
        self,
        image: Image.Image,
        prompts: Sequence[str],
        box_threshold: float,
        text_threshold: float,
    ) -> list[Detection]:
        """Boxes for ``prompts`` in ``image`` pixels; see :meth:`detect_with_stats`."""
        return self.detect_with_stats(image, prompts, box_threshold, text_threshold)[0]

    def detect_with_stats(
        self,
        image: Image.Image,
        prompts: Sequence[str],
        box_threshold: float,
        text_threshold: float,
    ) -> tuple[list[Detection], DetectionStats]:
        """Every query with box score (max token probability) >= ``box_threshold`` whose best
        phrase scores >= ``text_threshold``, as a Detection of that phrase's prompt index.

        Detections from several captions are concatenated; overlapping boxes are left to
        the pipeline's NMS.
        """
        with self._lock:  # a fast tokenizer shared by threads can fail with "Already borrowed"
            captions = self.captions(prompts)
        if not captions:
            return [], DetectionStats()
        width, height = image.size
        pixels = self.processor.image_processor(
            images=image.convert("RGB"), size=self.image_size, return_tensors="pt"
        )
        pixel_values = pixels["pixel_values"].to(self.device)
        pixel_mask = pixels["pixel_mask"].to(self.device)

        detections: list[Detection] = []
        above = unmatched = 0
        for caption in captions:
            input_ids = torch.tensor([caption.input_ids], device=self.device)
            with self._lock, inference_context(self.device, self.dtype):
                outputs = self.model(
                    pixel_values=pixel_values,
                    pixel_mask=pixel_mask,
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    token_type_ids=torch.zeros_like(input_ids),
                )
            # logits past the caption are -inf (sigmoid 0); cut them off anyway
            probs = outputs.logits[0, :, : len(caption.input_ids)].float().sigmoid().cpu()
            box_scores = probs.max(dim=1).values
            keep = torch.nonzero(box_scores >= box_threshold).flatten()
            above += len(keep)
            boxes = boxes_to_pixels(outputs.pred_boxes[0].cpu()[keep], width, height)
            assignments = assign_phrases(probs[keep].numpy(), caption.spans, text_threshold)
            for query, box, assignment in zip(keep.tolist(), boxes.tolist(), assignments, strict=True):
                if assignment is None:
                    unmatched += 1
                    continue
                x0, y0, x1, y1 = box
                if x1 <= x0 or y1 <= y0:
                    continue  # entirely outside the image after clipping
                detections.append(
                    Detection(
                        box=(x0, y0, x1, y1),
                        score=float(box_scores[query]),
                        prompt_index=caption.phrase_indices[assignment[0]],
                    )
                )
        return detections, DetectionStats(
            forwards=len(captions), above_box_threshold=above, unmatched=unmatched
        )
