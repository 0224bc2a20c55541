"""Tiny random SAM 3 checkpoints, written as the hub writes them, so tests load them through
the same ``from_pretrained`` path ``SEGMENTER_MODEL=facebook/sam3`` goes through.

facebook/sam3 is a *video* checkpoint (``model_type: sam3_video``): one safetensors file holding
the image detector under ``detector_model.*``, the click tracker under ``tracker_model.*`` and
the tracker's own FPN neck under ``tracker_neck.*``; the tracker has no ViT of its own (it reads
``detector_model.vision_encoder.backbone.*``, transformers' conversion mapping for
``sam3_tracker``). ``Sam3VideoModel.save_pretrained`` does not write that layout (it nests the
tracker keys twice), so the file is assembled here from the two image models' state dicts.

Recipe sizes follow shared/offline-models.md (112 px input, 14 px patches, 20 queries). The
weights are re-initialised (``reinit_weights``) so masks, boxes and scores depend visibly on the
image and the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import save_file
from transformers import (
    Sam3Config,
    Sam3ImageProcessor,
    Sam3Model,
    Sam3Processor,
    Sam3TrackerConfig,
    Sam3TrackerModel,
    Sam3TrackerVideoConfig,
    Sam3VideoConfig,
    Sam3VisionConfig,
    Sam3ViTConfig,
)

from tests.tiny_models import DEFAULT_WORDS, clip_text_config, clip_tokenizer
from tests.tiny_sam_models import _TRACKER_DECODER, reinit_weights

IMAGE_SIZE = 112
TEXT_LENGTH = 32  # Sam3Processor always pads the text to 32 tokens
_SMALL_LAYERS = dict(num_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)


def _vision_config() -> Sam3VisionConfig:
    vit = Sam3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=14,
        window_size=4,
        global_attn_indexes=[1],
        pretrain_image_size=56,
    )
    # 4x, 2x and 1x of the 8x8 patch grid
    return Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]
    )


def _tracker_parts() -> dict:
    return dict(
        vision_config=_vision_config().to_dict(),
        prompt_encoder_config=dict(hidden_size=32, image_size=IMAGE_SIZE, patch_size=14),
        mask_decoder_config=dict(_TRACKER_DECODER),
    )


def _processor(words: Iterable[str]) -> Sam3Processor:
    tokenizer = clip_tokenizer(words, TEXT_LENGTH)
    image_processor = Sam3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, mask_size={"height": 32, "width": 32}
    )
    return Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)


def _detector_config(processor: Sam3Processor) -> Sam3Config:
    return Sam3Config(
        vision_config=_vision_config().to_dict(),
        text_config=clip_text_config(processor.tokenizer, projection_dim=32),
        geometry_encoder_config=dict(_SMALL_LAYERS),
        detr_encoder_config=dict(_SMALL_LAYERS),
        detr_decoder_config=dict(_SMALL_LAYERS, num_layers=2, num_queries=20),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )


def build_tiny_sam3_image(path: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """``Sam3Model.save_pretrained`` (``model_type: sam3``): the detector alone, no click head."""
    processor = _processor(words)
    model = Sam3Model(_detector_config(processor))
    reinit_weights(model, seed=0)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def build_tiny_sam3(path: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """The facebook/sam3 layout (``model_type: sam3_video``): detector + tracker sharing one ViT."""
    processor = _processor(words)
    detector = Sam3Model(_detector_config(processor))
    reinit_weights(detector, seed=0)
    tracker = Sam3TrackerModel(Sam3TrackerConfig(**_tracker_parts()))
    reinit_weights(tracker, seed=1)
    # the video tracker config re-derives the sizes of its parts from its own image_size
    tracker_config = Sam3TrackerVideoConfig(image_size=IMAGE_SIZE, **_tracker_parts())
    return save_sam3_hub_checkpoint(path, detector, tracker, tracker_config, processor)


def save_sam3_hub_checkpoint(
    path: str | Path,
    detector: Sam3Model,
    tracker: Sam3TrackerModel,
    tracker_config: Sam3TrackerVideoConfig,
    processor: Sam3Processor,
) -> Path:
    """Write ``detector`` and ``tracker`` in the facebook/sam3 layout (see the module docstring);
    the benchmarks write their real-size random SAM 3 with it too, so both load like the hub's."""
    folder = Path(path)
    tensors = {f"detector_model.{name}": value for name, value in detector.state_dict().items()}
    for name, value in tracker.state_dict().items():
        if name.startswith("vision_encoder.backbone."):
            continue  # the hub checkpoint stores the ViT once, under the detector
        if name.startswith("vision_encoder.neck."):
            tensors[f"tracker_neck.{name.removeprefix('vision_encoder.neck.')}"] = value
        else:
            tensors[f"tracker_model.{name}"] = value
    config = Sam3VideoConfig(detector_config=detector.config.to_dict(), tracker_config=tracker_config.to_dict())
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({name: value.contiguous() for name, value in tensors.items()}, folder / "model.safetensors")
    processor.save_pretrained(folder)
    return folder
