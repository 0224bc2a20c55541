"""The folded SAM decoder (backend/models/sam_decoder.py) against transformers' own forward.

The fold rewrites every attention of the two-way transformer, so a mistake in a head
reshape, a dropped bias or a wrong softmax axis would change masks everywhere; these tests
compare whole outputs, with weights large enough that attention is far from uniform (at
HF's default init std 0.02 the decoder barely depends on its prompts, see tiny_sam_models).
"""

from __future__ import annotations

import pytest
import torch
from transformers import SamConfig, SamModel

from backend.models.base import PromptSet
from backend.models.sam import SamSegmenter
from backend.models.sam_decoder import FoldedSamDecoder
from tests.tiny_sam_models import build_tiny_sam, build_tiny_sam_hq, reinit_weights, tiny_sam_config


def _prompts(n: int, low_res: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(n, 1, 2, 2, generator=generator) * 1000
    boxes = torch.tensor([[[100.0 + 50 * i, 200.0, 500.0, 700.0 - 30 * i]] for i in range(n)])
    return {
        "one positive point": {"input_points": points[:, :, :1], "input_labels": torch.ones(n, 1, 1, dtype=torch.long)},
        "positive + negative": {"input_points": points, "input_labels": torch.tensor([[[1, 0]]] * n)},
        "box": {"input_boxes": boxes},
        "box + point": {
            "input_boxes": boxes,
            "input_points": points[:, :, :1],
            "input_labels": torch.ones(n, 1, 1, dtype=torch.long),
        },
        "point + mask prompt": {
            "input_points": points[:, :, :1],
            "input_labels": torch.ones(n, 1, 1, dtype=torch.long),
            "input_masks": torch.randn(n, 1, low_res, low_res, generator=generator) * 10,
        },
    }


def _tiny_model() -> SamModel:
    model = SamModel(tiny_sam_config()).eval()
    reinit_weights(model, std=0.3)
    return model


def _real_size_model() -> SamModel:
    """SAM ViT-B's decoder (8 heads, 256 wide, attention downsampled to 128): the head layout
    the fold must get right for real checkpoints."""
    torch.manual_seed(0)
    model = SamModel(SamConfig()).eval()
    reinit_weights(model, std=0.05)
    return model


@pytest.mark.parametrize("build", [_tiny_model, _real_size_model], ids=["tiny", "vit-b-decoder"])
def test_folded_decoder_equals_the_model_forward(build):
    model = build()
    decoder = FoldedSamDecoder(model)
    channels = model.config.mask_decoder_config.hidden_size
    embeddings = torch.randn(1, channels, 64, 64, generator=torch.Generator().manual_seed(2))
    n = 3
    for name, prompt in _prompts(n, 256).items():
        for multimask in (True, False):
            with torch.inference_mode():
                expected = model(
                    image_embeddings=embeddings.expand(n, -1, -1, -1), multimask_output=multimask, **prompt
                )
                iou, masks = decoder(embeddings, multimask_output=multimask, **prompt)
            assert masks.shape == expected.pred_masks.shape, name
            assert iou.shape == expected.iou_scores.shape, name
            spread = float(expected.pred_masks.std())
            assert spread > 0.1, f"{name}: logits too flat to compare ({spread})"
            torch.testing.assert_close(masks, expected.pred_masks, rtol=1e-4, atol=1e-4 * spread, msg=name)
            torch.testing.assert_close(iou, expected.iou_scores, rtol=1e-4, atol=1e-4, msg=name)
            # the answers differ between prompt sets, so a batch mix-up would show
            assert not torch.allclose(masks[0], masks[1]), name


def test_folded_decoder_under_bfloat16_autocast_stays_close_to_the_forward():
    model = _tiny_model()
    decoder = FoldedSamDecoder(model)
    embeddings = torch.randn(1, 32, 64, 64, generator=torch.Generator().manual_seed(3))
    prompt = _prompts(2, 256)["box + point"]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(image_embeddings=embeddings.expand(2, -1, -1, -1), multimask_output=True, **prompt)
        _, masks = decoder(embeddings, multimask_output=True, **prompt)
    agree = ((masks.float() > 0) == (expected.pred_masks.float() > 0)).float().mean()
    assert agree > 0.98


def test_plain_sam_segments_through_the_folded_decoder_and_other_families_do_not(tmp_path, monkeypatch):
    sam = SamSegmenter(str(build_tiny_sam(tmp_path / "sam")))
    hq = SamSegmenter(str(build_tiny_sam_hq(tmp_path / "hq")))
    from PIL import Image

    image = Image.new("RGB", (96, 64), (120, 60, 30))
    prompt = [PromptSet(box=(10.0, 10.0, 60.0, 50.0))]
    sam_embedding, hq_embedding = sam.embed(image), hq.embed(image)
    folded, sam.folded_decoder = sam.folded_decoder, None  # the model's own forward, for reference
    (expected,) = sam.segment(sam_embedding, prompt)
    sam.folded_decoder = folded

    def refuse(*args, **kwargs):
        raise AssertionError("the model's own forward ran")

    monkeypatch.setattr(sam.model, "forward", refuse)
    (prediction,) = sam.segment(sam_embedding, prompt)
    assert prediction.score == pytest.approx(expected.score, rel=1e-4)
    assert (prediction.mask == expected.mask).mean() > 0.999
    monkeypatch.setattr(hq.model, "forward", refuse)
    with pytest.raises(AssertionError, match="own forward"):
        hq.segment(hq_embedding, prompt)
