"""Test-only models with exact, known geometry (never shipped, never a default).

``BoxDetector`` reports given boxes for given phrases; ``BoxFillSegmenter`` answers a box
prompt with exactly the box's pixels and a point prompt with a fixed square around it, so
tests can assert regions pixel for pixel. ``ShapeSegmenter`` answers a click on an image of
flat-coloured shapes with the shape under it (what an ideal SAM would do), for the point grid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from backend.models.base import Box, Detection, ImageEmbedding, MaskCandidates, MaskPrediction, PromptSet

CRISP_LOGIT = 10.0  # fake logits: far from 0, so masks are stable under a +/-1 threshold shift


def _logits(mask: np.ndarray, magnitude: float = CRISP_LOGIT) -> np.ndarray:
    return np.where(mask, magnitude, -magnitude).astype(np.float32)


class BoxDetector:
    """Phrase -> list of (box, score); every call is recorded."""

    model_id = "test/box-detector"

    def __init__(self, boxes: Mapping[str, Sequence[tuple[Box, float]]]) -> None:
        self.boxes = {k.lower(): list(v) for k, v in boxes.items()}
        self.calls: list[tuple[str, ...]] = []

    def detect(
        self, image: Image.Image, prompts: Sequence[str], box_threshold: float, text_threshold: float
    ) -> list[Detection]:
        self.calls.append(tuple(prompts))
        found = []
        for index, phrase in enumerate(prompts):
            for box, score in self.boxes.get(phrase.lower(), []):
                if score >= box_threshold:
                    found.append(Detection(box=box, score=score, prompt_index=index))
        return found


class BoxFillSegmenter:
    """Box prompt -> the box's pixels; points -> a (2r+1)^2 square around the positive points."""

    model_id = "test/box-fill-segmenter"

    def __init__(self, embed_delay_s: float = 0.0, point_radius: int = 5, score: float = 0.9) -> None:
        self.embed_delay_s = embed_delay_s
        self.point_radius = point_radius
        self.score = score
        self.embed_calls = 0
        self.segment_calls: list[list[PromptSet]] = []
        self._lock = threading.Lock()

    def embed(self, image: Image.Image) -> ImageEmbedding:
        with self._lock:
            self.embed_calls += 1
        if self.embed_delay_s:
            time.sleep(self.embed_delay_s)
        return ImageEmbedding(self.model_id, (image.height, image.width), {"dummy": np.zeros(4)})

    def segment(
        self, embedding: ImageEmbedding, prompts: Sequence[PromptSet], multimask: bool = False
    ) -> list[MaskPrediction]:
        self.segment_calls.append(list(prompts))
        height, width = embedding.image_size
        out = []
        for prompt in prompts:
            mask = np.zeros((height, width), dtype=bool)
            if prompt.box is not None:
                x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
                mask[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = True
            r = self.point_radius
            for (x, y), positive in zip(prompt.points, prompt.point_labels, strict=True):
                xi, yi = int(x), int(y)
                mask[max(yi - r, 0):yi + r + 1, max(xi - r, 0):xi + r + 1] = bool(positive)
            out.append(MaskPrediction(mask=mask, score=self.score, low_res_logits=np.zeros((256, 256), np.float32)))
        return out

    def segment_candidates(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]) -> list[MaskCandidates]:
        """One candidate per prompt set: ``segment``'s mask as crisp full-resolution logits."""
        return [
            MaskCandidates(_logits(p.mask)[None], np.array([p.score], np.float32), embedding.image_size)
            for p in self.segment(embedding, prompts)
        ]


class ShapeSegmenter:
    """A click -> the 8-connected region of one colour under it, on images of flat shapes.

    Like SAM's multimask output, each click gets three candidates at full resolution:
    the region with crisp logits (``score``); the region's bounding box with soft logits of
    +/-0.5 (``score + 0.02``, so it would win NMS, but unstable: nothing survives a threshold
    shift of 1); and the whole image (``whole_score``, low). A click on black (the background)
    gets the background region with ``background_score``. A box prompt clicks its centre.
    Every ``segment_candidates`` call's prompt count is recorded.
    """

    model_id = "test/shape-segmenter"

    def __init__(self, score: float = 0.95, whole_score: float = 0.5, background_score: float = 0.3) -> None:
        self.score = score
        self.whole_score = whole_score
        self.background_score = background_score
        self.embedded_sizes: list[tuple[int, int]] = []
        self.batch_sizes: list[int] = []

    def embed(self, image: Image.Image) -> ImageEmbedding:
        pixels = np.asarray(image.convert("RGB"))
        regions = np.zeros(pixels.shape[:2], dtype=np.int32)
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        next_id = 0
        for colour in colours:
            count, labels = cv2.connectedComponents(np.all(pixels == colour, axis=2).astype(np.uint8), connectivity=8)
            regions[labels > 0] = labels[labels > 0] + next_id
            next_id += count - 1
        background = np.all(pixels == 0, axis=2)
        self.embedded_sizes.append((image.height, image.width))
        tensors = {"regions": regions, "background": background}
        return ImageEmbedding(self.model_id, (image.height, image.width), tensors)

    def segment_candidates(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]) -> list[MaskCandidates]:
        self.batch_sizes.append(len(prompts))
        regions, background = embedding.tensors["regions"], embedding.tensors["background"]
        out = []
        for prompt in prompts:
            if prompt.points:
                x, y = (int(v) for v in prompt.points[0])
            else:
                assert prompt.box is not None
                x, y = int((prompt.box[0] + prompt.box[2]) / 2), int((prompt.box[1] + prompt.box[3]) / 2)
            region = regions == regions[y, x]
            rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
            box_fill = np.zeros_like(region)
            box_fill[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
            score = self.background_score if background[y, x] else self.score
            logits = np.stack([_logits(region), _logits(box_fill, 0.5), _logits(np.ones_like(region))])
            scores = np.array([score, score + 0.02, self.whole_score], np.float32)
            out.append(MaskCandidates(logits, scores, embedding.image_size))
        return out

    def segment(
        self, embedding: ImageEmbedding, prompts: Sequence[PromptSet], multimask: bool = False
    ) -> list[MaskPrediction]:
        return [
            MaskPrediction(mask=c.logits[0] > 0, score=float(c.scores[0]))
            for c in self.segment_candidates(embedding, prompts)
        ]
