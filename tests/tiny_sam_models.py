"""Tiny random SAM-family models, saved with ``save_pretrained`` so tests load them through
the same ``from_pretrained`` path a hub id or a user's local folder goes through.

Recipes follow shared/offline-models.md. Weights are re-initialised (see ``reinit_weights``)
because HF SAM initialises some layers with std 1e-10: every mask logit is then ~0 and tests
comparing masks or picking a best candidate would pass for the wrong reason.
Each builder returns the folder it wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam2VisionConfig,
    Sam3ImageProcessor,
    Sam3TrackerConfig,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
    Sam3VisionConfig,
    Sam3ViTConfig,
    SamConfig,
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQModel,
    SamHQProcessor,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
    SamImageProcessor,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

# num_pos_feats must be half the prompt-encoder width, else box embedding fails (256 vs 32)
_SAM_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    output_channels=32,
    global_attn_indexes=[1],
    mlp_dim=64,
    num_pos_feats=16,
)
_TRACKER_DECODER = dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)


def reinit_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every weight matrix/kernel, embedding and bias a visible random value.

    Measured on these tiny models: with std 0.02 the decoder output did not depend on the box
    at all (max logit difference between two boxes exactly 0), with 0.1 boxes, clicks and
    mask prompts all move the logits. The random Fourier matrices
    (``*positional_embedding``) keep their construction values: they turn coordinates into
    features, and shrinking them makes every prompt look the same.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "positional_embedding" in name:
                continue
            if param.dim() >= 2 or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _save(model: torch.nn.Module, processor: object, path: str | Path) -> Path:
    folder = Path(path)
    reinit_weights(model)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_sam_config() -> SamConfig:
    """SamModel's config (the facebook/sam-vit-* and SlimSAM layout) at the real 1024 px input,
    so the low-resolution logits are the real 256x256."""
    return SamConfig(
        vision_config=SamVisionConfig(**_SAM_VISION).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32).to_dict(),
    )


def build_tiny_sam(path: str | Path) -> Path:
    """A tiny :func:`tiny_sam_config` SamModel with visible random weights."""
    processor = SamProcessor(image_processor=SamImageProcessor())
    return _save(SamModel(tiny_sam_config()), processor, path)


def build_tiny_sam_hq(path: str | Path) -> Path:
    """SamHQModel: the SAM recipe plus the HQ decoder, whose ``vit_dim`` is the ViT width."""
    config = SamHQConfig(
        vision_config=SamHQVisionConfig(**_SAM_VISION).to_dict(),
        prompt_encoder_config=SamHQPromptEncoderConfig(hidden_size=32).to_dict(),
        mask_decoder_config=SamHQMaskDecoderConfig(hidden_size=32, vit_dim=32).to_dict(),
    )
    processor = SamHQProcessor(image_processor=SamImageProcessor())
    return _save(SamHQModel(config), processor, path)


def build_tiny_sam2(path: str | Path) -> Path:
    """Sam2Model at 256 px (so its low-res logits are 64x64: tests cannot assume 256)."""
    backbone = Sam2HieraDetConfig(
        hidden_size=16,
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        blocks_per_stage=[1, 1, 2, 1],
        global_attention_blocks=[3],
        window_size_per_stage=[8, 4, 4, 2],
        image_size=[256, 256],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[128, 64, 32, 16],
        fpn_hidden_size=32,
        backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
    )
    config = Sam2Config(
        vision_config=vision.to_dict(),
        prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16),
        mask_decoder_config=dict(_TRACKER_DECODER),
    )
    processor = Sam2Processor(
        image_processor=Sam2ImageProcessor(size={"height": 256, "width": 256}, mask_size={"height": 64, "width": 64})
    )
    return _save(Sam2Model(config), processor, path)


def build_tiny_sam3_tracker(path: str | Path) -> Path:
    """Sam3TrackerModel (SAM 3's click head) at 112 px with a 14 px patch."""
    vit = Sam3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=112,
        patch_size=14,
        window_size=4,
        global_attn_indexes=[1],
        pretrain_image_size=56,
    )
    vision = Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]
    )
    config = Sam3TrackerConfig(
        vision_config=vision.to_dict(),
        prompt_encoder_config=dict(hidden_size=32, image_size=112, patch_size=14),
        mask_decoder_config=dict(_TRACKER_DECODER),
    )
    processor = Sam3TrackerProcessor(
        image_processor=Sam3ImageProcessor(size={"height": 112, "width": 112}, mask_size={"height": 32, "width": 32})
    )
    return _save(Sam3TrackerModel(config), processor, path)


def build_tiny_sam2_video(path: str | Path) -> Path:
    """The tiny SAM 2 saved as the *video* model (``model_type: sam2_video``), the layout of
    the hub's facebook/sam2.1-hiera-* repositories, with the image processor."""
    image_folder = build_tiny_sam2(Path(path) / "image")
    image_config = Sam2Config.from_pretrained(image_folder)
    config = Sam2VideoConfig(
        vision_config=image_config.vision_config.to_dict(),
        prompt_encoder_config=image_config.prompt_encoder_config.to_dict(),
        mask_decoder_config=image_config.mask_decoder_config.to_dict(),
    )
    return _save(Sam2VideoModel(config), Sam2Processor.from_pretrained(image_folder), Path(path) / "video")
