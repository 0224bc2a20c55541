"""OWLv2 (open-vocabulary ViT detector) through transformers, behind the ``Detector`` interface.

Unlike GroundingDINO, OWLv2 embeds every prompt separately (CLIP text tower, 16 tokens
each) and scores each box query against each prompt embedding, so all prompts go in one
forward and the class of a box is a prompt index directly: there are no captions, no token
spans and no text threshold.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, Owlv2ForObjectDetection

from backend.models.base import Detection
from backend.models.grounding_dino import DetectionStats, clip_boxes
from backend.models.loading import ModelLoadError, inference_context, load_pretrained, resolve_device


class Owlv2Detector:
    """Text prompts -> boxes with OWLv2 (e.g. ``google/owlv2-base-patch16-ensemble``).

    ``box_threshold`` is the per-box score threshold (sigmoid of the best prompt logit);
    ``text_threshold`` is accepted for the interface and ignored, because each box's score
    already *is* its score for one prompt. OWLv2 scores are lower than GroundingDINO's
    (0.1-0.3 is a typical threshold), so configure thresholds per detector.
    ``device``/``dtype`` as for :class:`~backend.models.grounding_dino.GroundingDinoDetector`.
    The image is padded to a square and resized to the model's input size (960 px for the
    released models). Prompts longer than the text tower's 16 tokens are truncated.
    """

    def __init__(self, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = dtype
        config = load_pretrained(AutoConfig, model_id, what="detector config")
        if config.model_type != "owlv2":
            raise ModelLoadError(
                f"detector {model_id!r} is a {config.model_type!r} model; Owlv2Detector loads 'owlv2' "
                f"(use GroundingDinoDetector for GroundingDINO)"
            )
        self.processor = load_pretrained(AutoProcessor, model_id, what="detector processor")
        self.model = load_pretrained(Owlv2ForObjectDetection, model_id, what="detector", config=config)
        self.model.to(self.device).eval()
        self._lock = threading.Lock()

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
        """Every box query whose best prompt scores above ``box_threshold``, labelled with that
        prompt's index. ``text_threshold`` is ignored (see the class docstring); ``unmatched``
        is always 0 since every box has a best prompt."""
        if not prompts:
            return [], DetectionStats()
        width, height = image.size
        # the lock also covers the tokenizer: fast tokenizers shared by threads can fail
        # with "Already borrowed"
        with self._lock:
            inputs = self.processor(
                text=[[prompt.strip() for prompt in prompts]],
                images=image.convert("RGB"),
                return_tensors="pt",
                truncation=True,
            ).to(self.device)
            with inference_context(self.device, self.dtype):
                outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float().cpu()
        outputs.pred_boxes = outputs.pred_boxes.float().cpu()
        # boxes are relative to the padded square; the processor scales by the longer side
        (result,) = self.processor.post_process_grounded_object_detection(
            outputs, threshold=box_threshold, target_sizes=[(height, width)]
        )
        boxes = clip_boxes(result["boxes"], width, height)
        detections = []
        for box, score, label in zip(
            boxes.tolist(), result["scores"].tolist(), result["labels"].tolist(), strict=True
        ):
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                continue  # entirely in the padding after clipping
            detections.append(Detection(box=(x0, y0, x1, y1), score=float(score), prompt_index=int(label)))
        above = len(result["scores"])
        return detections, DetectionStats(forwards=1, above_box_threshold=above, unmatched=0)
