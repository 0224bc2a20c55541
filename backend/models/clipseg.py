"""CLIPSeg (transformers ``CLIPSegForImageSegmentation``) behind
:class:`~backend.models.base.TextHeatmapSegmenter`: one dense probability map per phrase.

CLIPSeg plays the part of language-driven semantic segmentation (LSeg) for amorphous "stuff"
labels (sky, road, grass, water) that a box describes badly. Its processor squashes the image
to a fixed square (352x352 for ``CIDAS/clipseg-rd64-refined``) without keeping the aspect, so
the logit map covers the whole image and is stretched back to the original size.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from backend.models.loading import inference_context, load_pretrained


def logits_to_heatmaps(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) logits over the whole image -> (n, H, W) probabilities at ``size`` (H, W).

    The logits are resized first and squashed second: bilinear interpolation of logits keeps
    a sharp, smooth boundary where interpolating probabilities would blur it, and thresholding
    the probability at p is then the same as thresholding the resized logits at logit(p).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (n, h, w), got shape {tuple(logits.shape)}")
    resized = F.interpolate(logits[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(resized[:, 0]).cpu().numpy().astype(np.float32)


class ClipSegHeatmaps:
    """``model_id`` is a hub id (``CIDAS/clipseg-rd64-refined``) or a ``save_pretrained``
    folder holding a CLIPSegForImageSegmentation and its processor."""

    def __init__(self, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.model = (
            load_pretrained(CLIPSegForImageSegmentation, model_id, what="CLIPSeg model").to(device).eval()
        )
        self.processor = load_pretrained(CLIPSegProcessor, model_id, what="CLIPSeg processor")
        self._lock = threading.Lock()

    def heatmaps(self, image: Image.Image, phrases: Sequence[str]) -> np.ndarray:
        """(len(phrases), H, W) probabilities that each pixel shows each phrase.

        The image is preprocessed once and shared by every phrase (an expanded view, not copies
        of the pixels); the model still runs its vision tower per phrase, which is how CLIPSeg
        conditions its decoder.
        """
        if not phrases:
            raise ValueError("heatmaps needs at least one phrase")
        image = image.convert("RGB")
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor(text=list(phrases), padding=True, return_tensors="pt").to(self.device)
        with self._lock, inference_context(self.device, self.dtype):
            logits = self.model(
                pixel_values=pixels.expand(len(phrases), -1, -1, -1),
                input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
            ).logits
        return logits_to_heatmaps(
            logits.reshape(len(phrases), *logits.shape[-2:]), (image.height, image.width)
        )
