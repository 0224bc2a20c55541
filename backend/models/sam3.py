"""SAM 3 ("Segment Anything with Concepts"): text -> instance masks in one model, and SAM 3's
click tracker on the same image features.

Where the time goes (real size, CPU, shared/offline-models.md): the 446M-parameter ViT is
~83% of a whole forward; the FPN neck ~3%; each text prompt (CLIP text encoder, DETR encoder
and decoder, mask decoder) ~13%. So:

* :meth:`Sam3ConceptSegmenter.embed` runs only the ViT and returns its output; the pipeline
  keeps it in the embedding cache under (image hash, ``model_id``), so an image's ViT runs once
  for all of its labels, for later text prompts, and for the click tracker.
* :meth:`Sam3ConceptSegmenter.segment_concepts` runs the neck once per call and then one
  detector pass per prompt on those features (several prompts in one forward are not
  broadcast by transformers, and batching them saved little here). Text features are kept per
  prompt in a small LRU: a project's label phrases repeat on every task.
* Region score = detection score x presence score (sigmoid of the query's logit times sigmoid
  of the image-level "is this concept present at all" logit): the presence head is what keeps
  SAM 3 from drawing a best-matching wrong object for a concept that is not in the image. This
  is also transformers' ``post_process_instance_segmentation`` score.
* Masks: the decoder's 288x288 logits of the kept queries only, resized one at a time to the
  original size as the processor does (bilinear on probabilities, > 0.5) and kept as booleans.
  The processor's own post-processing would resize all kept queries at once and return int64
  (50 masks of a 12 MP image: 4.8 GB).

:class:`Sam3SharedTrackerSegmenter` is the click segmenter of the SAM 3 route: SAM 3's tracker
(the SAM 2-style point/box decoder) whose ViT *is* the concept model's ViT module, so one copy
of the backbone is held, and its ``embed`` starts from the cached ViT output: a task that was
pre-annotated from its label names is warm for clicks.

The hub checkpoint facebook/sam3 is a video layout (``model_type: sam3_video``; AutoModel would
build the video model): the image classes ``Sam3Model`` / ``Sam3TrackerModel`` are loaded
explicitly and read their parts of it. It is gated (README: access, licence, offline use).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from backend.embedding_cache import EmbeddingCache, cache_key
from backend.images import pixel_sha256
from backend.models.base import ConceptInstance, ImageEmbedding
from backend.models.loading import ModelLoadError, inference_context, load_pretrained, resolve_device
from backend.models.sam import SamSegmenter

SAM3_MODEL_TYPES: tuple[str, ...] = ("sam3", "sam3_video")
"""config.json ``model_type`` of checkpoints holding the SAM 3 detector: ``sam3`` (Sam3Model
saved alone) and ``sam3_video`` (the hub layout, detector + tracker)."""

TEXT_CACHE_SIZE = 256
_MASK_PROBABILITY = 0.5  # the processor's mask_threshold


def _full_size_mask(probabilities: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """(h, w) mask probabilities at the model's resolution -> bool (H, W) at the image's, as
    ``Sam3Processor.post_process_instance_segmentation`` resizes and thresholds them."""
    resized = F.interpolate(probabilities[None, None], size=image_size, mode="bilinear", align_corners=False)
    return (resized[0, 0] > _MASK_PROBABILITY).numpy()


def _refuse_missing_weights(model_id: str, class_name: str, info: dict[str, Any], what: str) -> None:
    """transformers only logs weights a checkpoint lacks and leaves them random: a model that
    silently draws noise is worse than one that refuses to start."""
    missing = sorted(set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())})
    if missing:
        raise ModelLoadError(
            f"{model_id!r} loaded as {class_name} but {len(missing)} weights were not in the checkpoint "
            f"(e.g. {', '.join(missing[:5])}): it is not a {what}"
        )


def _spatial(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens (batch, rows*cols, channels) -> the (batch, channels, rows, cols) map the FPN
    necks read (as ``Sam3VisionModel.forward`` reshapes them)."""
    return hidden.view(hidden.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


class Sam3ConceptSegmenter:
    """:class:`~backend.models.base.ConceptSegmenter` over a SAM 3 checkpoint (hub id or local
    folder; ``sam3`` or ``sam3_video`` layout). Weights stay float32, ``dtype`` is the compute
    dtype (see ``loading.inference_context``)."""

    def __init__(
        self,
        model_id: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_cache_size: int = TEXT_CACHE_SIZE,
    ) -> None:
        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = dtype
        model, info = load_pretrained(Sam3Model, model_id, what="SAM 3 model", output_loading_info=True)
        _refuse_missing_weights(model_id, "Sam3Model", info, "SAM 3 checkpoint")
        self.model: Sam3Model = model.to(self.device).eval()
        self.processor: Sam3Processor = load_pretrained(Sam3Processor, model_id, what="SAM 3 processor")
        size = self.processor.image_processor.size
        patch = self.model.config.vision_config.backbone_config.patch_size
        self.grid: tuple[int, int] = (int(size["height"]) // patch, int(size["width"]) // patch)
        self._lock = threading.Lock()
        # called only with the lock held (it runs the text encoder)
        self._text_features = functools.lru_cache(maxsize=text_cache_size)(self._encode_text)

    # -- image part (cached by the pipeline) ----------------------------------------------

    def embed(self, image: Image.Image) -> ImageEmbedding:
        """The ViT output for ``image`` (float32, CPU): what both the concept passes and the
        tracker start from. The necks are not included: they are cheap next to the ViT and
        their 4-level output is ~5x larger, so caching them would cost more memory than time."""
        image = image.convert("RGB")
        pixel_values = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        with self._lock, inference_context(self.device, self.dtype):
            hidden = self.model.vision_encoder.backbone(pixel_values.to(self.device)).last_hidden_state
        return ImageEmbedding(
            model_id=self.model_id,
            image_size=(image.height, image.width),
            tensors={"backbone": hidden.float().cpu(), "grid": self.grid},
        )

    def backbone_tokens(self, embedding: ImageEmbedding) -> torch.Tensor:
        """The cached ViT output of ``embedding`` as a (1, channels, rows, cols) map on the device."""
        if embedding.model_id != self.model_id:
            raise ValueError(f"embedding is from {embedding.model_id!r}, this model is {self.model_id!r}")
        return _spatial(embedding.tensors["backbone"].to(self.device), tuple(embedding.tensors["grid"]))

    # -- prompt part ----------------------------------------------------------------------

    def _encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected text features, attention mask) of one prompt, as ``Sam3Model.forward``
        computes them from ``input_ids``."""
        tokens = self.processor(text=prompt, return_tensors="pt")
        input_ids = tokens["input_ids"].to(self.device)
        attention_mask = tokens["attention_mask"].to(self.device)
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return features, attention_mask

    def segment_concepts(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[str],
        threshold: float,
        max_per_prompt: int = 100,
    ) -> list[ConceptInstance]:
        """Every instance of each prompt scoring at least ``threshold``, the best
        ``max_per_prompt`` per prompt; ``prompt_index`` points into ``prompts``."""
        found: list[ConceptInstance] = []
        spatial = self.backbone_tokens(embedding)
        with self._lock, inference_context(self.device, self.dtype):
            fpn, positions = self.model.vision_encoder.neck(spatial)
            vision = Sam3VisionEncoderOutput(fpn_hidden_states=fpn, fpn_position_encoding=positions)
            for index, prompt in enumerate(prompts):
                features, attention_mask = self._text_features(prompt)
                output = self.model(
                    vision_embeds=vision,
                    text_embeds=BaseModelOutputWithPooling(pooler_output=features),
                    attention_mask=attention_mask,
                )
                found += self._instances(output, index, threshold, max_per_prompt, embedding.image_size)
        return found

    @staticmethod
    def _instances(
        output: Any, prompt_index: int, threshold: float, limit: int, image_size: tuple[int, int]
    ) -> list[ConceptInstance]:
        """One prompt's output -> instances: score = detection x presence, boxes in pixels
        (clipped to the image); each mask stays at the model's resolution until the pipeline
        asks for it (``ConceptInstance.full_mask``), i.e. only for the instances it keeps."""
        height, width = image_size
        scores = output.pred_logits[0].float().sigmoid() * output.presence_logits[0].float().sigmoid()
        kept = torch.nonzero(scores >= threshold).flatten()
        kept = kept[scores[kept].argsort(descending=True)][:limit]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        instances = []
        for query in kept.tolist():
            box = (output.pred_boxes[0, query].float().cpu() * scale).clamp(min=torch.zeros(4), max=scale)
            probabilities = output.pred_masks[0, query].float().sigmoid().cpu()
            instances.append(
                ConceptInstance(
                    box=tuple(float(v) for v in box),
                    score=float(scores[query]),
                    prompt_index=prompt_index,
                    upsample=functools.partial(_full_size_mask, probabilities, image_size),
                )
            )
        return instances


class Sam3SharedTrackerSegmenter(SamSegmenter):
    """SAM 3's click tracker whose ViT is the concept model's: one backbone in memory, one
    backbone run per image for text prompts and clicks alike.

    Everything but ``embed`` is :class:`~backend.models.sam.SamSegmenter` (decoder batching,
    mask prompts, candidates for the everything mode). ``embed`` takes the ViT output from the
    embedding cache entry the concept route writes (computing it there on a miss) and runs only
    the tracker's own FPN neck and decoder projections on it. The cache is keyed by the pixel
    hash, the same key the pipelines use for the image (``images.pixel_sha256``).
    """

    def __init__(
        self,
        model_id: str,
        concept: Sam3ConceptSegmenter,
        cache: EmbeddingCache,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 16,
        model_type: str | None = None,
    ) -> None:
        super().__init__(model_id, device=device, dtype=dtype, max_batch_size=max_batch_size, model_type=model_type)
        if not isinstance(self.model, Sam3TrackerModel):
            raise ModelLoadError(f"{model_id!r} is not a SAM 3 tracker checkpoint ({type(self.model).__name__})")
        ours = self.processor.image_processor.to_dict()
        theirs = concept.processor.image_processor.to_dict()
        if ours != theirs:
            changed = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
            raise ModelLoadError(
                f"the SAM 3 tracker {model_id!r} preprocesses images differently from the concept model "
                f"{concept.model_id!r} ({', '.join(changed)}): they cannot share image features"
            )
        # the tracker's own copy of the ViT is dropped here (freed with its last reference)
        self.model.vision_encoder.backbone = concept.model.vision_encoder.backbone
        # its embeddings are not the concept model's, so they need a cache key of their own
        self.model_id = f"{model_id}#tracker"
        self.concept = concept
        self.cache = cache

    def embed(self, image: Image.Image) -> ImageEmbedding:
        """The tracker's three feature maps, from the cached (or now computed) ViT output;
        equal to ``Sam3TrackerModel.get_image_embeddings`` on the image."""
        image = image.convert("RGB")
        backbone = self.cache.get_or_compute(
            cache_key(pixel_sha256(image), self.concept.model_id), lambda: self.concept.embed(image)
        )
        spatial = self.concept.backbone_tokens(backbone)
        model = self.model
        with self._lock, inference_context(self.device, self.dtype):
            levels = list(model.vision_encoder.neck(spatial)[0])
            # as Sam3TrackerModel.get_image_features / get_image_embeddings: the decoder's
            # high-resolution projections are applied once here, and the "no memory" token is
            # added to the last level (which the 3 feature sizes then leave out, as upstream)
            levels[0] = model.mask_decoder.conv_s0(levels[0])
            levels[1] = model.mask_decoder.conv_s1(levels[1])
            levels[-1] = levels[-1] + model.no_memory_embedding.view(1, -1, 1, 1)
            embeddings = [level.cpu() for level in levels[: len(model.backbone_feature_sizes)]]
        return ImageEmbedding(
            model_id=self.model_id,
            image_size=(image.height, image.width),
            tensors={"input_size": self._input_size((image.height, image.width)), "image_embeddings": embeddings},
        )
