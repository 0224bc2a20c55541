"""CLIP zero-shot classification (transformers ``CLIPModel``) behind
:class:`~backend.models.base.ZeroShotClassifier`: labels automatic masks by their crops.

Text embeddings are computed once per call (a project has a handful of labels) and image
crops go through the vision tower in batches, so a hundred masks cost a few batched forwards.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from backend.models.loading import inference_context, load_pretrained

PROMPT_TEMPLATE = "a photo of a {}."
"""CLIP was trained on captions, and its paper's zero-shot results use this template: a bare
word ("cat") scores worse than a caption-like sentence."""


class ClipClassifier:
    """``model_id`` is a hub id (``openai/clip-vit-base-patch32``) or a ``save_pretrained``
    folder holding a CLIPModel and its processor."""

    def __init__(
        self, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.model = load_pretrained(CLIPModel, model_id, what="CLIP model").to(device).eval()
        self.processor = load_pretrained(CLIPProcessor, model_id, what="CLIP processor")
        self._lock = threading.Lock()

    def classify(self, images: Sequence[Image.Image], phrases: Sequence[str]) -> np.ndarray:
        """Softmax over ``phrases`` (each wrapped in :data:`PROMPT_TEMPLATE`) per image."""
        if not phrases:
            raise ValueError("classify needs at least one phrase")
        if not images:
            return np.zeros((0, len(phrases)), dtype=np.float32)
        texts = [PROMPT_TEMPLATE.format(phrase) for phrase in phrases]
        text_inputs = self.processor(text=texts, padding=True, return_tensors="pt").to(self.device)
        rows: list[torch.Tensor] = []
        with self._lock, inference_context(self.device, self.dtype):
            text = self.model.get_text_features(**text_inputs).pooler_output.float()
            text = torch.nn.functional.normalize(text, dim=-1)
            scale = self.model.logit_scale.exp().float()
            for start in range(0, len(images), self.batch_size):
                chunk = [image.convert("RGB") for image in images[start : start + self.batch_size]]
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
                vision = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
                vision = torch.nn.functional.normalize(vision, dim=-1)
                rows.append((scale * vision @ text.T).softmax(dim=-1).cpu())
        return torch.cat(rows).numpy().astype(np.float32)
