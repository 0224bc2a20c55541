"""Official segment-anything ``.pth`` checkpoints (vit_b / vit_l / vit_h) behind
:class:`~backend.models.base.Segmenter`, for users who have the original files
(``sam_vit_h_4b8939.pth``...) rather than a transformers folder.

The math is ``segment_anything.SamPredictor``'s (``ResizeLongestSide``, ``Sam.preprocess``,
prompt encoder + mask decoder, ``Sam.postprocess_masks``), but without its per-image state:
the embedding lives in an :class:`~backend.models.base.ImageEmbedding` the cache can keep,
so one model serves many images and threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from backend.models.base import ImageEmbedding, MaskCandidates, MaskPrediction, PromptSet
from backend.models.loading import ModelLoadError, inference_context, resolve_device
from backend.models.sam import (
    check_prompts,
    group_key,
    mask_to_low_res_logits,
    resolve_batch_size,
    segment_in_groups,
)

logger = logging.getLogger(__name__)

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
# segment_anything.build_sam passes these to Sam(); they are non-persistent buffers, so a
# state dict does not carry them
_PIXEL_MEAN = (123.675, 116.28, 103.53)
_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class EncoderShape:
    """The ViT image-encoder hyperparameters a checkpoint was trained with."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]

    @property
    def variant(self) -> str:
        """``vit_b``/``vit_l``/``vit_h`` for the released shapes, else a description."""
        for name, shape in KNOWN_VARIANTS.items():
            if shape == self:
                return name
        return f"custom ViT (dim {self.embed_dim}, depth {self.depth}, heads {self.num_heads})"


# the arguments segment_anything.build_sam gives _build_sam for each registry entry
KNOWN_VARIANTS: dict[str, EncoderShape] = {
    "vit_b": EncoderShape(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderShape(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderShape(1280, 32, 16, (7, 15, 23, 31)),
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file (tensors only: ``weights_only`` refuses pickled code),
    unwrapped from a ``{"model": ...}``/``{"state_dict": ...}`` training wrapper if present."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(
            f"segment-anything checkpoint {str(path)!r} does not exist -- download it (e.g. "
            "sam_vit_b_01ec64.pth from the segment-anything README) and point SEGMENTER_MODEL at the file"
        )
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for unreadable files
        raise ModelLoadError(
            f"could not read {str(path)!r} as a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(loaded, Mapping) and _PATCH_KEY not in loaded:
        for wrapper in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or _PATCH_KEY not in loaded:
        raise ModelLoadError(
            f"{str(path)!r} is not a segment-anything ViT checkpoint (no {_PATCH_KEY}); "
            "MobileSAM/EfficientSAM/SAM-HQ files need their own code or a transformers folder"
        )
    return dict(loaded)


def encoder_shape(state_dict: Mapping[str, torch.Tensor]) -> EncoderShape:
    """Read the encoder hyperparameters off the tensor shapes, so a renamed file still loads
    as what it is: width from the patch embedding, depth from the block count, heads from
    the relative-position tables (one row per offset, one column per head channel), and the
    global-attention blocks as those whose tables span the whole token grid, not a window."""
    embed_dim = int(state_dict[_PATCH_KEY].shape[0])
    grid = int(state_dict["image_encoder.pos_embed"].shape[1])
    depth = 0
    global_blocks: list[int] = []
    head_dim = 0
    while f"image_encoder.blocks.{depth}.attn.rel_pos_h" in state_dict:
        table = state_dict[f"image_encoder.blocks.{depth}.attn.rel_pos_h"]
        head_dim = int(table.shape[1])
        if table.shape[0] == 2 * grid - 1:
            global_blocks.append(depth)
        depth += 1
    if depth == 0 or head_dim == 0 or embed_dim % head_dim:
        raise ModelLoadError("checkpoint has no relative-position tables: not a segment-anything ViT encoder")
    return EncoderShape(embed_dim, depth, embed_dim // head_dim, tuple(global_blocks))


def build_sam(state_dict: Mapping[str, torch.Tensor], source: str) -> Sam:
    """A ``Sam`` with the checkpoint's shape holding the checkpoint's tensors.

    Built on the meta device and filled with ``assign=True``: no random initialisation of
    630M parameters (vit_h) and no second copy of the weights in memory.
    """
    shape = encoder_shape(state_dict)
    with torch.device("meta"):
        sam = _build_sam(
            encoder_embed_dim=shape.embed_dim,
            encoder_depth=shape.depth,
            encoder_num_heads=shape.num_heads,
            encoder_global_attn_indexes=list(shape.global_attn_indexes),
        )
    try:
        sam.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{source!r} looks like a segment-anything {shape.variant} checkpoint but its tensors do not "
            f"fit that model: {str(exc).splitlines()[0]}"
        ) from exc
    sam.pixel_mean = torch.tensor(_PIXEL_MEAN).view(-1, 1, 1)
    sam.pixel_std = torch.tensor(_PIXEL_STD).view(-1, 1, 1)
    left_empty = [name for name, t in chain(sam.named_parameters(), sam.named_buffers()) if t.is_meta]
    if left_empty:
        raise ModelLoadError(f"{source!r} does not hold {', '.join(left_empty[:5])}")
    return sam.eval()


class SamCheckpointSegmenter:
    """:class:`~backend.models.base.Segmenter` over an official segment-anything ``.pth`` file.

    The variant (vit_b/l/h) comes from the tensor shapes, not the file name. ``device``,
    ``dtype`` (compute dtype, autocast) and ``max_batch_size`` mean what they mean for
    :class:`~backend.models.sam.SamSegmenter`.
    """

    def __init__(
        self,
        checkpoint: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 0,
    ) -> None:
        self.model_id = checkpoint
        self.device = resolve_device(device)
        self.dtype = dtype
        self.max_batch_size = resolve_batch_size(max_batch_size, self.device, dtype)
        state_dict = read_state_dict(checkpoint)
        self.variant = encoder_shape(state_dict).variant
        self.model: Sam = build_sam(state_dict, checkpoint).to(self.device)
        logger.info("loaded segment-anything %s from %s", self.variant, checkpoint)
        self._img_size = int(self.model.image_encoder.img_size)
        self._transform = ResizeLongestSide(self._img_size)
        self.low_res_size: tuple[int, int] = tuple(int(s) for s in self.model.prompt_encoder.mask_input_size)
        self._lock = threading.Lock()

    def _input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return ResizeLongestSide.get_preprocess_shape(image_size[0], image_size[1], self._img_size)

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """A full-resolution 0/1 mask as this model's mask prompt (see ``sam.mask_to_low_res_logits``)."""
        return mask_to_low_res_logits(
            mask, self._input_size(mask.shape[:2]), (self._img_size, self._img_size), self.low_res_size
        )

    def embed(self, image: Image.Image) -> ImageEmbedding:
        """``SamPredictor.set_image`` without the predictor: resize the longest side, normalise,
        pad, encode once; CPU tensors for the cache."""
        array = np.asarray(image.convert("RGB"))
        resized = torch.as_tensor(self._transform.apply_image(array), device=self.device)
        pixels = resized.permute(2, 0, 1).contiguous()[None].float()
        with self._lock, inference_context(self.device, self.dtype):
            features = self.model.image_encoder(self.model.preprocess(pixels))
        tensors: dict[str, Any] = {"image_embeddings": features.cpu(), "input_size": tuple(pixels.shape[-2:])}
        return ImageEmbedding(model_id=self.model_id, image_size=array.shape[:2], tensors=tensors)

    def segment(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[PromptSet],
        multimask: bool = False,
    ) -> list[MaskPrediction]:
        """One mask per prompt set, in order; same-shaped prompt sets share one decoder call
        (the official decoder batches prompts against one image embedding)."""
        check_prompts(embedding, prompts, self.model_id, self.low_res_size)
        return segment_in_groups(
            prompts, self.max_batch_size, lambda batch: self._segment_batch(embedding, batch, multimask)
        )

    def segment_candidates(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]) -> list[MaskCandidates]:
        """All three multimask candidates per prompt set as low-res logits, for the point
        grid of the everything mode (:class:`~backend.models.base.CandidateSegmenter`)."""
        check_prompts(embedding, prompts, self.model_id, self.low_res_size)
        in_h, in_w = embedding.tensors["input_size"]
        low_h, low_w = self.low_res_size
        # the image fills the top-left input_size of the padded img_size square
        extent = (in_h * low_h / self._img_size, in_w * low_w / self._img_size)

        def run(batch: list[PromptSet]) -> list[MaskCandidates]:
            iou, low_res = self._decode(embedding, batch, multimask=True)
            return [MaskCandidates(low_res[i].cpu().numpy(), iou[i].cpu().numpy(), extent) for i in range(len(batch))]

        return segment_in_groups(prompts, self.max_batch_size, run)

    def _segment_batch(
        self, embedding: ImageEmbedding, batch: Sequence[PromptSet], multimask: bool
    ) -> list[MaskPrediction]:
        """The best candidate of each prompt set, upsampled to the original size with
        ``Sam.postprocess_masks`` (``SamPredictor``'s geometry)."""
        iou, candidates = self._decode(embedding, batch, multimask)
        best = iou.argmax(dim=-1)
        rows = torch.arange(len(batch), device=best.device)
        chosen = candidates[rows, best]  # (n, h, w)
        scores = iou[rows, best]
        original_size = tuple(embedding.image_size)
        input_size = tuple(embedding.tensors["input_size"])
        with torch.inference_mode():
            return [
                MaskPrediction(
                    mask=(
                        self.model.postprocess_masks(chosen[i][None, None], input_size, original_size)
                        > self.model.mask_threshold
                    )[0, 0]
                    .cpu()
                    .numpy(),
                    score=float(scores[i]),
                    low_res_logits=chosen[i].cpu().numpy(),
                )
                for i in range(len(batch))
            ]

    def _decode(
        self, embedding: ImageEmbedding, batch: Sequence[PromptSet], multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch`` for same-shaped prompt sets, before any choice:
        predicted IoU (n, k) and low-res logits (n, k, h, w) of every candidate, float32."""
        original_size = tuple(embedding.image_size)
        points = None
        boxes = None
        masks = None
        if batch[0].points:
            coords = self._transform.apply_coords(np.array([list(p.points) for p in batch]), original_size)
            labels = np.array([list(p.point_labels) for p in batch])
            points = (
                torch.as_tensor(coords, dtype=torch.float32, device=self.device),
                torch.as_tensor(labels, dtype=torch.int32, device=self.device),
            )
        if batch[0].box is not None:
            scaled = self._transform.apply_boxes(np.array([list(p.box) for p in batch]), original_size)
            boxes = torch.as_tensor(scaled, dtype=torch.float32, device=self.device)
        if group_key(batch[0])[2]:
            stacked = np.stack(
                [
                    np.asarray(p.mask_logits, dtype=np.float32)
                    if p.mask_logits is not None
                    else self.mask_to_logits(p.prior_mask)
                    for p in batch
                ]
            )
            masks = torch.from_numpy(stacked)[:, None].to(self.device)
        image_embeddings = embedding.tensors["image_embeddings"].to(self.device)
        with self._lock, inference_context(self.device, self.dtype):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=image_embeddings,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return iou.float(), low_res.float()
