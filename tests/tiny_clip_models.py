"""Tiny random CLIP and CLIPSeg models, saved with ``save_pretrained`` so tests load them
through the same ``from_pretrained`` path as a hub id (``openai/clip-vit-base-patch32``,
``CIDAS/clipseg-rd64-refined``). The tokenizer is the offline byte-level CLIP BPE of
tiny_models.py (no download). Each builder returns the folder it wrote.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

from tests.tiny_models import clip_text_config, clip_tokenizer

WORDS = ("a", "photo", "of", "sky", "road", "grass", "cat", "dog", "background")
_TEXT_LENGTH = 16
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16)


def _text_config(words: Iterable[str]) -> tuple[dict, CLIPTokenizer]:
    tokenizer = clip_tokenizer(words, _TEXT_LENGTH)
    return clip_text_config(tokenizer, num_hidden_layers=2), tokenizer


def build_tiny_clip(path: str | Path, words: Iterable[str] = WORDS) -> Path:
    """CLIPModel at 64 px (4x4 patches) + CLIPProcessor."""
    text, tokenizer = _text_config(words)
    config = CLIPConfig(text_config=text, vision_config=dict(_VISION, image_size=64), projection_dim=32)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
    )
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def build_tiny_clipseg(path: str | Path, words: Iterable[str] = WORDS) -> Path:
    """CLIPSegForImageSegmentation at 64 px (the real one is 352) + CLIPSegProcessor.

    ``extract_layers`` index the vision tower's layers from 0 and must stay below its depth.
    """
    text, tokenizer = _text_config(words)
    config = CLIPSegConfig(
        text_config=text,
        vision_config=dict(_VISION, image_size=64),
        projection_dim=32,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    CLIPSegForImageSegmentation(config).save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)
