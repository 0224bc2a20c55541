"""Click/box segmenter for the transformers SAM family: SAM (ViT-B/L/H), SlimSAM, SAM-HQ,
SAM 2 / 2.1 and SAM 3's tracker head, all behind :class:`~backend.models.base.Segmenter`.

The image encoder is the expensive part (seconds on CPU); the prompt encoder + mask
decoder are cheap. So ``embed`` runs the encoder once per image and returns CPU tensors the
embedding cache can keep, and ``segment`` runs only the decoder, with every prompt set of a
call in as few batched decoder calls as their shapes allow.

Two input geometries exist in the family and every coordinate conversion here follows the
model's own processor:

* SAM / SAM-HQ ("padded"): the longest side is resized to 1024 and the image is padded at
  the bottom/right to 1024x1024, so the 256x256 low-resolution logits cover the padding too.
* SAM 2 / SAM 3 tracker ("stretched"): the image is resized to a square, ignoring aspect.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoConfig,
    Sam2Model,
    Sam2Processor,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
    SamHQModel,
    SamHQProcessor,
    SamModel,
    SamProcessor,
)

from backend.models.base import ImageEmbedding, MaskCandidates, MaskPrediction, PromptSet
from backend.models.loading import ModelLoadError, inference_context, load_pretrained, resolve_device
from backend.models.sam_decoder import FoldedSamDecoder

logger = logging.getLogger(__name__)

MASK_LOGIT_MAGNITUDE = 10.0
"""Logit given to "surely inside" / "surely outside" when a binary mask becomes a mask
prompt: sigmoid(10) ~ 0.99995, about as confident as SAM's own low-res answers, while a
boundary pixel that is half covered gets ~0 so the decoder is free to move the edge."""


@dataclass(frozen=True)
class _Family:
    """How one transformers SAM variant is loaded and what its embeddings look like."""

    model_cls: type
    processor_cls: type
    padded: bool  # longest-side resize + bottom/right pad (SAM) vs. squash to a square (SAM 2/3)
    hq: bool = False  # SAM-HQ: the decoder also reads the first ViT intermediate map
    multiscale: bool = False  # SAM 2/3: a list of feature maps (high-res ones feed the upsampler)


_SAM = _Family(SamModel, SamProcessor, padded=True)
_SAM_HQ = _Family(SamHQModel, SamHQProcessor, padded=True, hq=True)
_SAM2 = _Family(Sam2Model, Sam2Processor, padded=False, multiscale=True)
_SAM3_TRACKER = _Family(Sam3TrackerModel, Sam3TrackerProcessor, padded=False, multiscale=True)

# config.json ``model_type`` -> family. The hub's SAM 2.1 and SAM 3 repositories are *video*
# layouts (AutoModel would build the video classes); the image classes load their weights.
_FAMILIES: dict[str, _Family] = {
    "sam": _SAM,
    "sam_hq": _SAM_HQ,
    "sam2": _SAM2,
    "sam2_video": _SAM2,
    "sam3_tracker": _SAM3_TRACKER,
    "sam3_tracker_video": _SAM3_TRACKER,
    "sam3_video": _SAM3_TRACKER,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def mask_to_low_res_logits(
    mask: np.ndarray,
    input_size: tuple[int, int],
    frame_size: tuple[int, int],
    low_res_size: tuple[int, int],
    magnitude: float = MASK_LOGIT_MAGNITUDE,
) -> np.ndarray:
    """A full-resolution 0/1 mask as a SAM mask prompt (``low_res_size`` float32 logits).

    Mirrors the image preprocessing so the mask lands where the model saw those pixels:
    resize to ``input_size`` (the image's size inside the model frame), pad bottom/right to
    ``frame_size`` (no-op for stretched models, where both are the square frame), then
    area-average down to ``low_res_size``. Partly covered low-res cells get logits near 0.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    shrinking = input_size[0] < mask.shape[0] or input_size[1] < mask.shape[1]
    resized = F.interpolate(tensor, size=input_size, mode="bilinear", align_corners=False, antialias=shrinking)
    framed = F.pad(resized, (0, frame_size[1] - input_size[1], 0, frame_size[0] - input_size[0]))
    coverage = F.interpolate(framed, size=low_res_size, mode="area")[0, 0]
    return ((coverage * 2.0 - 1.0) * magnitude).numpy().astype(np.float32)


def group_key(prompt: PromptSet) -> tuple[int, bool, bool]:
    """Prompt sets with the same key stack into one decoder batch. Different point counts are
    not padded together: a padding point still changes the decoder's attention slightly."""
    has_mask = prompt.mask_logits is not None or prompt.prior_mask is not None
    return (len(prompt.points), prompt.box is not None, has_mask)


def validate_prompt(prompt: PromptSet, image_size: tuple[int, int], low_res_size: tuple[int, int]) -> None:
    """Reject a prompt set the decoder would misread or crash on, with a message that says
    which field is wrong (shared by both SAM adapters)."""
    if len(prompt.points) != len(prompt.point_labels):
        raise ValueError(f"{len(prompt.points)} points but {len(prompt.point_labels)} point labels")
    if any(label not in (0, 1) for label in prompt.point_labels):
        raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {list(prompt.point_labels)}")
    if not prompt.points and prompt.box is None:
        raise ValueError("a prompt set needs at least one point or a box")
    if prompt.mask_logits is not None and tuple(prompt.mask_logits.shape) != low_res_size:
        raise ValueError(
            f"mask_logits has shape {tuple(prompt.mask_logits.shape)} but this model takes {low_res_size}: "
            "pass a previous answer's low_res_logits from the same model, or a full-size prior_mask"
        )
    if prompt.prior_mask is not None and tuple(prompt.prior_mask.shape) != tuple(image_size):
        raise ValueError(f"prior_mask has shape {tuple(prompt.prior_mask.shape)} but the image is {image_size} (h, w)")


def check_prompts(
    embedding: ImageEmbedding, prompts: Sequence[PromptSet], model_id: str, low_res_size: tuple[int, int]
) -> None:
    """Fail before any decoder call: an embedding from another model (a cache mix-up) or a
    malformed prompt set would otherwise give a wrong mask or a shape error deep in torch."""
    if embedding.model_id != model_id:
        raise ValueError(f"embedding is from {embedding.model_id!r}, this segmenter is {model_id!r}")
    for prompt in prompts:
        validate_prompt(prompt, embedding.image_size, low_res_size)


def upsample_padded_logits(
    low_res: torch.Tensor,
    frame_size: tuple[int, int],
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """(h, w) low-res logits of a padded SAM -> (H, W) bool mask at ``original_size``: exactly
    ``SamImageProcessor.post_process_masks`` (bilinear to the padded frame, crop to
    ``input_size``, bilinear to the original size, logit > 0), with less work.

    Only the low-res rows/columns the crop reads are upsampled: at the same scale, bilinear
    interpolation reads the same two neighbours with the same weights for every kept pixel,
    so the result is identical (tested) and a 4:3 image skips a quarter of the first resize.
    The second resize is skipped when the image already has the input size (longest side
    1024), where it is the identity.
    """
    low_h, low_w = low_res.shape[-2:]
    scale_h, scale_w = frame_size[0] // low_h, frame_size[1] // low_w
    if (scale_h * low_h, scale_w * low_w) == tuple(frame_size):
        keep_h = min(low_h, math.ceil(input_size[0] / scale_h) + 1)
        keep_w = min(low_w, math.ceil(input_size[1] / scale_w) + 1)
        size = (keep_h * scale_h, keep_w * scale_w)
    else:  # a frame that is not a whole multiple of the logits: no shortcut
        keep_h, keep_w, size = low_h, low_w, tuple(frame_size)
    logits = low_res[None, None, :keep_h, :keep_w].float()
    framed = F.interpolate(logits, size, mode="bilinear", align_corners=False)[..., : input_size[0], : input_size[1]]
    if tuple(original_size) != tuple(input_size):
        framed = F.interpolate(framed, tuple(original_size), mode="bilinear", align_corners=False)
    return framed[0, 0] > 0


def resolve_batch_size(
    max_batch_size: int, device: str, dtype: torch.dtype = torch.float32, folded: bool = False
) -> int:
    """``SEGMENTER_BATCH_SIZE``: prompt sets per decoder call, 0 choosing by device, dtype and
    decoder (``folded``: :mod:`backend.models.sam_decoder`).

    On CPU a model's own decoder gives every prompt set its own copy of the 64x64x256 image
    embedding, and large batches of copies fall out of the CPU caches (bench/NOTES.md, SAM
    ViT-B, 2 cores). There, in float32, one per call is fastest (16 boxes: 1.19 s as 16 calls,
    2.05 s as one on an AVX2 EPYC; 2 per call 1.07-1.10x the time of 1 on an AMX Xeon); with
    bfloat16 autocast, whose copies are half the size, two per call is (AMX Xeon: 0.85-0.90x
    the time of 1). The folded decoder shares the first layer's image side among the prompt
    sets, so two per call wins in float32 too (AMX Xeon, 16 boxes: 0.73x the time of one per
    call in float32, 0.68x in bfloat16; four per call no better, sixteen slower). On CUDA a
    batch fills the GPU: 16.
    """
    if max_batch_size < 0:
        raise ValueError(f"SEGMENTER_BATCH_SIZE must be >= 0 (0: by device and dtype), got {max_batch_size}")
    if max_batch_size:
        return max_batch_size
    if torch.device(device).type != "cpu":
        return 16
    return 2 if folded or dtype == torch.bfloat16 else 1


T = TypeVar("T")


def segment_in_groups(
    prompts: Sequence[PromptSet],
    max_batch_size: int,
    run_batch: Callable[[list[PromptSet]], list[T]],
) -> list[T]:
    """Split prompt sets into same-shaped groups (:func:`group_key`), run each group in
    chunks of at most ``max_batch_size`` through ``run_batch``, and return the predictions
    in the order of ``prompts``."""
    groups: dict[tuple[int, bool, bool], list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[group_key(prompt)].append(index)
    results: dict[int, T] = {}
    for indices in groups.values():
        for start in range(0, len(indices), max_batch_size):
            chunk = indices[start : start + max_batch_size]
            predictions = run_batch([prompts[i] for i in chunk])
            results.update(zip(chunk, predictions, strict=True))
    return [results[index] for index in range(len(prompts))]


class SamSegmenter:
    """:class:`~backend.models.base.Segmenter` over a transformers SAM-family checkpoint.

    ``model_id`` is a hub id or a local ``save_pretrained`` folder; ``model_type`` (from
    config.json) picks the classes and is read from the config when not given. Weights stay
    float32; ``dtype`` is the compute dtype (autocast, see ``loading.inference_context``).
    ``max_batch_size`` bounds how many prompt sets share one decoder call (memory grows with
    it: each one gets its own copy of the image embedding inside the decoder); 0 picks it by
    device and dtype (:func:`resolve_batch_size`).
    """

    def __init__(
        self,
        model_id: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 0,
        model_type: str | None = None,
    ) -> None:
        device = resolve_device(device)
        if model_type is None:
            model_type = load_pretrained(AutoConfig, model_id, what="segmenter config").model_type
        if model_type not in _FAMILIES:
            raise ModelLoadError(
                f"{model_id!r} is a {model_type!r} model, not a click segmenter this backend knows "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.model_id = model_id
        self.model_type = model_type
        self.device = device
        self.dtype = dtype
        self._family = _FAMILIES[model_type]
        self.max_batch_size = resolve_batch_size(max_batch_size, device, dtype, folded=self._family is _SAM)
        self._lock = threading.Lock()

        model, info = load_pretrained(
            self._family.model_cls, model_id, what="segmenter model", output_loading_info=True
        )
        missing = sorted(set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())})
        if missing:
            # transformers only logs these and leaves the tensors random: a segmenter that
            # silently draws noise is worse than refusing to start
            raise ModelLoadError(
                f"{model_id!r} loaded as {self._family.model_cls.__name__} but {len(missing)} weights were "
                f"not in the checkpoint (e.g. {', '.join(missing[:5])}): it is not a {model_type} image "
                "checkpoint this class can read"
            )
        self.model = model.to(device).eval()
        # plain SAM's decoder runs folded (same output, less work: sam_decoder.py); None runs
        # the model's own forward (the other families, and the benches' naive baseline)
        self.folded_decoder: FoldedSamDecoder | None = FoldedSamDecoder(self.model) if self._family is _SAM else None
        self.processor = load_pretrained(self._family.processor_cls, model_id, what="segmenter processor")
        image_processor = self.processor.image_processor
        if self._family.padded:
            self._longest_edge = int(image_processor.size["longest_edge"])
            self._frame_size = (
                int(image_processor.pad_size["height"]),
                int(image_processor.pad_size["width"]),
            )
        else:
            side = int(self.processor.target_size)
            self._frame_size = (side, side)
        self.low_res_size: tuple[int, int] = tuple(4 * int(s) for s in self.model.prompt_encoder.image_embedding_size)

    @property
    def decoder_module(self) -> torch.nn.Module:
        """The module whose forward is one decoder call (prompt encoder + mask decoder), for
        timing hooks: the folded decoder where plain SAM uses it, else the model."""
        return self.folded_decoder if self.folded_decoder is not None else self.model

    # -- geometry -------------------------------------------------------------------------

    def _input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an ``image_size`` image inside the model frame (processor's own rule)."""
        if self._family.padded:
            h, w = self.processor.image_processor._get_preprocess_shape(image_size, self._longest_edge)
            return int(h), int(w)
        return self._frame_size

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """A full-resolution 0/1 mask (e.g. an existing region) as this model's mask prompt,
        so refinement clicks start from it (``PromptSet.mask_logits``)."""
        return mask_to_low_res_logits(mask, self._input_size(mask.shape[:2]), self._frame_size, self.low_res_size)

    def _mask_prompt(self, prompt: PromptSet) -> np.ndarray:
        """The low-res logits of a prompt set: its own ``mask_logits`` (the model's previous
        answer, exact) or else its full-size ``prior_mask`` converted."""
        if prompt.mask_logits is not None:
            return np.asarray(prompt.mask_logits, dtype=np.float32)
        assert prompt.prior_mask is not None
        return self.mask_to_logits(prompt.prior_mask)

    def _to_original(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
        """One (h, w) low-res logit map -> bool mask at the original size, with the processor's
        post-processing geometry (the one the model was trained against)."""
        if self._family.padded:
            input_size = tuple(embedding.tensors["input_size"])
            return upsample_padded_logits(low_res, self._frame_size, input_size, embedding.image_size).cpu().numpy()
        upsampled = self.processor.post_process_masks([low_res[None, None].float()], [list(embedding.image_size)])
        return upsampled[0][0, 0].cpu().numpy()

    # -- Segmenter ------------------------------------------------------------------------

    def embed(self, image: Image.Image) -> ImageEmbedding:
        """Run the vision encoder once; the result holds CPU tensors and the sizes
        ``segment`` needs to map prompts in and masks out."""
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        original_size = (image.height, image.width)
        tensors: dict[str, Any] = {"input_size": self._input_size(original_size)}
        with self._lock, inference_context(self.device, self.dtype):
            if self._family.hq:
                embeddings, intermediate = self.model.get_image_embeddings(pixel_values)
                tensors["image_embeddings"] = embeddings.cpu()
                # the HQ decoder reads only the first intermediate map (the early ViT block);
                # keeping the others would multiply the cached size by the global-block count
                tensors["intermediate_embeddings"] = [intermediate[0].cpu()]
            elif self._family.multiscale:
                embeddings = self.model.get_image_embeddings(pixel_values)
                tensors["image_embeddings"] = [level.cpu() for level in embeddings]
            else:
                tensors["image_embeddings"] = self.model.get_image_embeddings(pixel_values).cpu()
        return ImageEmbedding(model_id=self.model_id, image_size=original_size, tensors=tensors)

    def segment(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[PromptSet],
        multimask: bool = False,
    ) -> list[MaskPrediction]:
        """One mask per prompt set, in order; same-shaped prompt sets (e.g. N boxes) share one
        decoder call, up to ``max_batch_size`` each."""
        check_prompts(embedding, prompts, self.model_id, self.low_res_size)
        return segment_in_groups(
            prompts, self.max_batch_size, lambda batch: self._segment_batch(embedding, batch, multimask)
        )

    def segment_candidates(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]) -> list[MaskCandidates]:
        """All three multimask candidates per prompt set as low-res logits, for the point
        grid of the everything mode (:class:`~backend.models.base.CandidateSegmenter`)."""
        check_prompts(embedding, prompts, self.model_id, self.low_res_size)
        low_h, low_w = self.low_res_size
        if self._family.padded:  # the image fills the top-left input_size of the padded frame
            in_h, in_w = embedding.tensors["input_size"]
            extent = (in_h * low_h / self._frame_size[0], in_w * low_w / self._frame_size[1])
        else:  # stretched over the whole frame
            extent = (float(low_h), float(low_w))

        def run(batch: list[PromptSet]) -> list[MaskCandidates]:
            iou, low_res = self._decode(embedding, batch, multimask=True)
            return [MaskCandidates(low_res[i].cpu().numpy(), iou[i].cpu().numpy(), extent) for i in range(len(batch))]

        return segment_in_groups(prompts, self.max_batch_size, run)

    def _segment_batch(
        self, embedding: ImageEmbedding, batch: Sequence[PromptSet], multimask: bool
    ) -> list[MaskPrediction]:
        """The best candidate of each prompt set, upsampled to the original size."""
        iou, candidates = self._decode(embedding, batch, multimask)
        n = len(batch)
        best = iou.argmax(dim=-1)
        rows = torch.arange(n, device=best.device)
        low_res = candidates[rows, best]  # (n, h, w)
        scores = iou[rows, best]
        with torch.inference_mode():
            return [
                MaskPrediction(
                    mask=self._to_original(low_res[i], embedding),
                    score=float(scores[i]),
                    low_res_logits=low_res[i].cpu().numpy(),
                )
                for i in range(n)
            ]

    def _decode(
        self, embedding: ImageEmbedding, batch: Sequence[PromptSet], multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder call for same-shaped prompt sets: predicted IoU (n, k) and low-res
        logits (n, k, h, w) of every candidate, float32.

        Plain SAM runs the folded decoder on the one stored embedding. The other families' own
        forward gets the prompt sets along the *image* batch axis with the embedding expanded
        to match (a view, no copy): their decoder adds the dense (mask) prompt per image-batch
        entry, so this is the only layout where every prompt set can carry its own previous mask.
        """
        n = len(batch)
        height, width = embedding.image_size
        in_h, in_w = embedding.tensors["input_size"]
        scale = torch.tensor([in_w / width, in_h / height], dtype=torch.float32)
        kwargs: dict[str, Any] = {"multimask_output": multimask}
        if batch[0].points:
            points = torch.tensor([[list(p.points)] for p in batch], dtype=torch.float32) * scale
            kwargs["input_points"] = points.to(self.device)  # (n, 1, k, 2)
            kwargs["input_labels"] = torch.tensor(
                [[list(p.point_labels)] for p in batch], dtype=torch.int64, device=self.device
            )
        if batch[0].box is not None:
            boxes = torch.tensor([[list(p.box)] for p in batch], dtype=torch.float32) * scale.repeat(2)
            kwargs["input_boxes"] = boxes.to(self.device)  # (n, 1, 4)
        if group_key(batch[0])[2]:
            masks = np.stack([self._mask_prompt(p) for p in batch])
            kwargs["input_masks"] = torch.from_numpy(masks)[:, None].to(self.device)  # (n, 1, h, w)

        stored = embedding.tensors["image_embeddings"]
        if self.folded_decoder is not None:  # one (1, C, h, w) embedding serves the whole batch
            with self._lock, inference_context(self.device, self.dtype):
                iou, masks = self.folded_decoder(stored.to(self.device), **kwargs)
            return iou[:, 0].float(), masks[:, 0].float()

        def expand(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.to(self.device)
            return tensor.expand(n, *tensor.shape[1:])

        kwargs["image_embeddings"] = [expand(t) for t in stored] if self._family.multiscale else expand(stored)
        if self._family.hq:
            kwargs["intermediate_embeddings"] = [expand(t) for t in embedding.tensors["intermediate_embeddings"]]

        with self._lock, inference_context(self.device, self.dtype):
            output = self.model(**kwargs)
        return output.iou_scores[:, 0].float(), output.pred_masks[:, 0].float()
