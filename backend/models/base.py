"""The small interfaces every model adapter implements, and the plain data they exchange.

Pipelines only see these types, so any detector (GroundingDINO, OWLv2, MM-GroundingDINO),
any click segmenter (SAM, SAM-HQ, SAM 2, SAM 3 tracker, official ``.pth`` checkpoints) and any
one-model text -> mask route (SAM 3) can be swapped by configuration without touching them.
All coordinates are pixels of the image exactly as passed in (already EXIF-transposed),
boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive edges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One box found for one of the prompts the detector was given.

    ``prompt_index`` points into the prompt list of the call: labels are attached by the
    pipeline, never guessed by the adapter from decoded strings.
    """

    box: Box
    score: float
    prompt_index: int


@dataclass
class MaskPrediction:
    """One mask for one prompt set (a box, or points, or both).

    ``low_res_logits`` is SAM's 256x256 logit map: fed back as the next call's mask prompt
    it makes clicks refine the previous answer instead of starting over.
    """

    mask: np.ndarray  # bool, (H, W) of the original image
    score: float  # the segmenter's own quality estimate (SAM: predicted IoU)
    low_res_logits: np.ndarray | None = None


@dataclass
class MaskCandidates:
    """Every mask the decoder proposed for one prompt set (SAM: 3 with multimask), unchosen.

    Automatic mask generation ranks and filters candidates itself (predicted IoU, stability
    under a shifted threshold) and upsamples only the few it keeps, so it needs all of them as
    low-resolution logits. ``logits`` is the decoder's frame (SAM: 256x256 over the padded
    1024 input); the image covers ``[0, image_extent[0]) x [0, image_extent[1])`` of it, in
    logit cells (fractional: SAM pads bottom/right, SAM 2 stretches the image to fill it).
    """

    logits: np.ndarray  # float32 (k, h, w); > 0 is inside
    scores: np.ndarray  # float32 (k,): the segmenter's predicted IoU of each candidate
    image_extent: tuple[float, float]  # (rows, cols) of ``logits`` the image covers


@dataclass
class PromptSet:
    """The prompts for one mask: any of points (with 1 = positive, 0 = negative), one box,
    and a prior mask: either SAM's own low-resolution logits of a previous answer
    (``mask_logits``), or a full-resolution boolean mask of an existing region
    (``prior_mask``) that the adapter converts into its own logit frame."""

    points: Sequence[tuple[float, float]] = ()
    point_labels: Sequence[int] = ()
    box: Box | None = None
    mask_logits: np.ndarray | None = None
    prior_mask: np.ndarray | None = None


@dataclass
class ImageEmbedding:
    """What a segmenter computes once per image and reuses for every prompt.

    ``tensors`` is adapter-specific (CPU tensors or arrays); ``nbytes`` is what the
    embedding cache charges for it.
    """

    model_id: str
    image_size: tuple[int, int]  # (height, width) of the original image
    tensors: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        total = 0
        for value in self.tensors.values():
            for item in value if isinstance(value, list | tuple) else [value]:
                if hasattr(item, "element_size"):
                    total += item.element_size() * item.nelement()
                elif hasattr(item, "nbytes"):
                    total += int(item.nbytes)
        return total


@dataclass(frozen=True)
class ConceptInstance:
    """One instance found by a text -> mask model (SAM 3) for one prompt.

    The full-size mask is either given (``mask``) or made on demand (``upsample``): a model
    keeps up to ``max_per_prompt`` candidates per phrase, and as image-size booleans 100 of
    them on a 12 MP image would hold 1.2 GB before NMS and selection drop most of them.
    """

    box: Box
    score: float
    prompt_index: int
    mask: np.ndarray | None = None  # bool, (H, W)
    upsample: Callable[[], np.ndarray] | None = None  # -> the bool (H, W) mask

    def full_mask(self) -> np.ndarray:
        """The bool (H, W) mask, made now when the model left it to ``upsample``."""
        if self.mask is not None:
            return self.mask
        if self.upsample is None:
            raise ValueError("a ConceptInstance needs a mask or an upsample function")
        return self.upsample()


@runtime_checkable
class Detector(Protocol):
    """Text prompts -> boxes. One call per image covers all prompts (the adapter splits into
    as few forwards as its text encoder allows)."""

    model_id: str

    def detect(
        self,
        image: Image.Image,
        prompts: Sequence[str],
        box_threshold: float,
        text_threshold: float,
    ) -> list[Detection]: ...


@runtime_checkable
class Segmenter(Protocol):
    """Image + geometric prompts -> masks, with the image embedding computed separately so
    it can be cached and shared between pre-annotation and clicks."""

    model_id: str

    def embed(self, image: Image.Image) -> ImageEmbedding: ...

    def segment(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[PromptSet],
        multimask: bool = False,
    ) -> list[MaskPrediction]:
        """One mask per prompt set, in order. With ``multimask`` the adapter asks for
        several candidates per prompt set and returns the one with the best score."""
        ...


@runtime_checkable
class CandidateSegmenter(Segmenter, Protocol):
    """A segmenter that can also hand back all of its candidates per prompt, as logits: what
    the point-grid ("segment everything") pipeline needs. Separate from :class:`Segmenter`
    so adapters without it still serve boxes and clicks."""

    def segment_candidates(
        self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]
    ) -> list[MaskCandidates]:
        """All multimask candidates per prompt set, in order."""
        ...


@runtime_checkable
class ZeroShotClassifier(Protocol):
    """Images + text phrases -> probabilities (CLIP): labels automatic masks by their crops."""

    model_id: str

    def classify(self, images: Sequence[Image.Image], phrases: Sequence[str]) -> np.ndarray:
        """(len(images), len(phrases)) probabilities; each row sums to 1 over ``phrases``."""
        ...


@runtime_checkable
class TextHeatmapSegmenter(Protocol):
    """Image + text phrases -> one dense probability map per phrase (CLIPSeg): the route for
    amorphous "stuff" labels (sky, road, grass) that boxes describe badly."""

    model_id: str

    def heatmaps(self, image: Image.Image, phrases: Sequence[str]) -> np.ndarray:
        """float32 (len(phrases), H, W) in [0, 1] at the image's own size."""
        ...


@runtime_checkable
class ConceptSegmenter(Protocol):
    """Text prompts -> instance masks in one model (SAM 3): the route that replaces
    detector + segmenter for pre-annotation.

    Split like :class:`Segmenter`: ``embed`` runs the expensive image part once and the
    pipeline caches it by image and ``model_id``; ``segment_concepts`` is the cheap per-prompt
    part, so every label (and a later text prompt) reuses the cached image features.
    """

    model_id: str

    def embed(self, image: Image.Image) -> ImageEmbedding: ...

    def segment_concepts(
        self, embedding: ImageEmbedding, prompts: Sequence[str], threshold: float, max_per_prompt: int
    ) -> list[ConceptInstance]:
        """Instances scoring at least ``threshold`` for each prompt, at most ``max_per_prompt``
        (the best) per prompt, masks at the original image size."""
        ...
