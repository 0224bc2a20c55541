"""The speed levers of issue 9 keep the answers: each fast path against its reference.

* brush RLE (``backend.brush_rle``) against label-studio-sdk's encoder/decoder: same bytes;
* the trimmed mask upsampling against ``SamImageProcessor.post_process_masks``: same mask;
* bfloat16 autocast against float32 on a tiny SAM (re-initialised weights, so logits are not
  all ~0): masks within tolerance for the pre-annotation (boxes) and click paths;
* decoder batch size (``SEGMENTER_BATCH_SIZE``): per-box calls and one batched call agree;
* ``TORCH_THREADS`` is applied when models load, ``DETECTOR_MAX_SIZE`` caps the detector input.

bfloat16 GroundingDINO is not compared here: with random weights bf16 and fp32 select
different top-k queries, so their boxes differ for reasons real weights would not show.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle
from PIL import Image
from transformers import SamImageProcessor

from backend import brush_rle
from backend.config import ConfigError, Settings
from backend.models.base import PromptSet
from backend.models.loading import apply_torch_threads
from backend.models.registry import load_detector, load_models, load_segmenter
from backend.models.sam import resolve_batch_size, upsample_padded_logits
from backend.regions import decode_brush_rle, encode_brush_rle
from tests.tiny_models import build_tiny_grounding_dino
from tests.tiny_sam_models import build_tiny_sam

WIDTH, HEIGHT = 64, 48
BOXES = [(2.0, 3.0, 30.0, 40.0), (10.0, 10.0, 60.0, 45.0), (33.0, 0.0, 64.0, 20.0), (0.0, 20.0, 25.0, 48.0)]


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)  # SAM's random Fourier features come from the global generator
    return str(build_tiny_sam(tmp_path_factory.mktemp("sam")))


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory) -> str:
    return str(build_tiny_grounding_dino(tmp_path_factory.mktemp("gdino")))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8))


def runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))
    return np.diff(np.append(starts, values.size)), values[starts]


# -- brush RLE --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 131073, 200001])
def test_rle_encodes_every_run_length_class_as_the_sdk(length):
    """Each length-field class and the >65536 split, next to runs of 1 (literal words)."""
    values = np.concatenate([np.full(3, 5), np.full(length, 7), [0], np.full(length, 255), [9]]).astype(np.uint8)
    expected = encode_rle(values)
    assert brush_rle.encode_runs(*runs_of(values)) == expected
    np.testing.assert_array_equal(brush_rle.decode(bytes(expected)), decode_rle(expected))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.floats(0.0, 1.0),
    st.sampled_from(["random", "empty", "full", "blocks"]),
    st.integers(0, 2**32 - 1),
)
def test_mask_rle_matches_the_sdk_both_ways(height, width, density, kind, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((height, width)) < density
    if kind == "empty":
        mask[:] = False
    elif kind == "full":
        mask[:] = True
    elif kind == "blocks":
        mask = np.kron(mask[: height // 4 + 1, : width // 4 + 1], np.ones((4, 4), dtype=bool))[:height, :width]
    expected = mask2rle(mask.astype(np.uint8) * 255)
    assert brush_rle.encode_mask(mask) == expected
    assert encode_brush_rle(mask) == expected
    np.testing.assert_array_equal(brush_rle.decode(bytes(expected)), decode_rle(expected))
    np.testing.assert_array_equal(decode_brush_rle(expected, width, height), mask)


def test_rle_of_a_large_mask_round_trips():
    """A 1024x768 mask (the size whose SDK encoding took longer than the SAM decoder)."""
    yy, xx = np.mgrid[0:768, 0:1024]
    mask = ((xx - 500) ** 2 + (yy - 380) ** 2 < 300**2) ^ ((xx // 37 + yy // 29) % 5 == 0)
    rle = encode_brush_rle(mask)
    assert rle == mask2rle(mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(decode_brush_rle(rle, 1024, 768), mask)


def test_truncated_rle_is_refused():
    rle = encode_brush_rle(np.eye(20, dtype=bool))
    with pytest.raises(ValueError, match="truncated"):
        brush_rle.decode(bytes(rle[: len(rle) // 2]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_brush_rle(rle[: len(rle) // 2], 20, 20)


# -- mask upsampling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(768, 1024), (1024, 768), (1024, 1024), (48, 64), (3000, 4000), (7, 1500), (600, 601), (1, 1)]
)
def test_trimmed_upsampling_equals_the_processor(size):
    processor = SamImageProcessor()
    input_size = tuple(processor._get_preprocess_shape(size, 1024))
    logits = torch.randn(256, 256, generator=torch.Generator().manual_seed(sum(size))) * 4
    expected = processor.post_process_masks([logits[None, None]], [list(size)], [list(input_size)])[0][0, 0]
    assert torch.equal(upsample_padded_logits(logits, (1024, 1024), input_size, size), expected)


# -- dtype and decoder batching on a tiny SAM ---------------------------------------------------


def test_bfloat16_sam_masks_stay_within_tolerance_of_float32(sam_dir, image):
    """DTYPE=auto picks bfloat16 on CPUs with native bf16: the boxes (pre-annotation) and the
    click candidates (interactive) must stay close to float32.

    Measured here: mean logit error 0.4-1.5% of the logit range, 96-99.8% of pixels alike
    (flips only where the logit is near 0), predicted IoU within 0.17 (a tiny random model has
    small logits and an untrained IoU head, so bf16's ~1% error per op shows more than on
    ViT-B). The click is compared candidate by candidate: when two candidates' predicted IoUs
    are that close, bf16 may pick the other.
    """
    boxes = [PromptSet(box=box) for box in BOXES]
    click = PromptSet(points=[(20.0, 15.0)], point_labels=[1])
    answers = {}
    for dtype in ("float32", "bfloat16"):
        segmenter = load_segmenter(Settings(segmenter_model=sam_dir, device="cpu", dtype=dtype))
        embedding = segmenter.embed(image)
        predictions = segmenter.segment(embedding, boxes)
        candidates = segmenter.segment_candidates(embedding, [click])[0]
        logits = [p.low_res_logits for p in predictions] + list(candidates.logits)
        scores = [p.score for p in predictions] + list(candidates.scores)
        answers[dtype] = (logits, scores, [p.mask for p in predictions])
    (logits32, scores32, masks32), (logits16, scores16, masks16) = answers["float32"], answers["bfloat16"]
    for fp32, bf16 in zip(logits32, logits16, strict=True):
        scale = np.abs(fp32).max()
        assert np.abs(bf16 - fp32).mean() <= 0.03 * scale
        confident = np.abs(fp32) > 0.1 * scale  # cells near 0 may flip: that is the mask edge moving
        assert ((fp32 > 0) == (bf16 > 0))[confident].mean() >= 0.99
    for fp32, bf16 in zip(masks32, masks16, strict=True):
        assert fp32.any()
        assert (fp32 == bf16).mean() >= 0.95
    np.testing.assert_allclose(scores16, scores32, atol=0.2)


def test_decoder_batch_size_does_not_change_the_masks(sam_dir, image):
    """SEGMENTER_BATCH_SIZE is a speed choice only: one call per box or all boxes in one."""
    prompts = [PromptSet(box=box) for box in BOXES] + [PromptSet(points=[(40.0, 30.0)], point_labels=[1])]
    results = {}
    for batch in (1, 16):
        segmenter = load_segmenter(Settings(segmenter_model=sam_dir, device="cpu", dtype="float32",
                                            segmenter_batch_size=batch))
        results[batch] = segmenter.segment(segmenter.embed(image), prompts)
    for single, batched in zip(results[1], results[16], strict=True):
        np.testing.assert_allclose(single.low_res_logits, batched.low_res_logits, atol=1e-4)
        assert (single.mask != batched.mask).sum() <= 2
        assert single.score == pytest.approx(batched.score, abs=1e-5)


def test_segmenter_batch_size_defaults_by_device(sam_dir):
    """On CPU a model's own decoder: per-box calls in float32, two per call with bfloat16; the
    folded decoder (plain SAM): two per call in both (each measured fastest there); batches of
    16 on CUDA; explicit wins."""
    assert Settings().segmenter_batch_size == 0
    assert resolve_batch_size(0, "cpu") == 1
    assert resolve_batch_size(0, "cpu", torch.float32) == 1
    assert resolve_batch_size(0, "cpu", torch.bfloat16) == 2
    assert resolve_batch_size(0, "cpu", torch.float32, folded=True) == 2
    assert resolve_batch_size(0, "cpu", torch.bfloat16, folded=True) == 2
    assert resolve_batch_size(0, "cuda:0") == 16
    assert resolve_batch_size(0, "cuda:0", folded=True) == 16
    assert resolve_batch_size(0, "cuda:0", torch.bfloat16) == 16
    assert resolve_batch_size(4, "cpu") == 4
    assert resolve_batch_size(4, "cpu", torch.bfloat16) == 4
    with pytest.raises(ValueError, match="SEGMENTER_BATCH_SIZE"):
        resolve_batch_size(-1, "cpu")
    assert load_segmenter(Settings(segmenter_model=sam_dir, device="cpu", dtype="float32")).max_batch_size == 2
    assert load_segmenter(Settings(segmenter_model=sam_dir, device="cpu", dtype="bfloat16")).max_batch_size == 2
    assert load_segmenter(Settings(segmenter_model=sam_dir, device="cpu", dtype="bfloat16",
                                   segmenter_batch_size=1)).max_batch_size == 1


def test_bf16_decoder_batch_of_two_matches_one_per_call(sam_dir, image):
    """The bfloat16 default (two prompt sets per decoder call) draws the masks one call per
    prompt set draws, within bfloat16 rounding."""
    prompts = [PromptSet(box=box) for box in BOXES] + [PromptSet(points=[(40.0, 30.0)], point_labels=[1])]
    segmenter = load_segmenter(Settings(segmenter_model=sam_dir, device="cpu", dtype="bfloat16"))
    assert segmenter.max_batch_size == 2
    embedding = segmenter.embed(image)
    paired = segmenter.segment(embedding, prompts)
    segmenter.max_batch_size = 1
    single = segmenter.segment(embedding, prompts)
    for one, two in zip(single, paired, strict=True):
        assert one.mask.any()
        assert (one.mask == two.mask).mean() >= 0.99
        assert one.score == pytest.approx(two.score, abs=0.05)


# -- TORCH_THREADS and DETECTOR_MAX_SIZE ---------------------------------------------------------


def test_torch_threads_is_applied_when_models_load(sam_dir, gdino_dir, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    load_models(Settings(detector_model=gdino_dir, segmenter_model=sam_dir, device="cpu", torch_threads=1))
    assert calls == [1]
    load_models(Settings(detector_model=gdino_dir, segmenter_model=sam_dir, device="cpu"))
    assert calls == [1], "TORCH_THREADS=0 must leave torch's default alone"
    with pytest.raises(ConfigError, match="TORCH_THREADS"):
        apply_torch_threads(-1)


def test_torch_threads_reach_threads_started_later():
    """The loader thread sets it; request threads that start afterwards run with it."""
    original = torch.get_num_threads()
    seen: list[int] = []

    def in_thread(fn) -> None:
        worker = threading.Thread(target=fn)
        worker.start()
        worker.join()

    try:
        in_thread(lambda: apply_torch_threads(1))
        in_thread(lambda: seen.append(torch.get_num_threads()))
    finally:
        in_thread(lambda: torch.set_num_threads(original))
    assert seen == [1]


def test_detector_max_size_caps_the_detector_input(gdino_dir, image):
    default = load_detector(Settings(detector_model=gdino_dir, device="cpu"))
    assert default.image_size["longest_edge"] == 160  # the tiny processor's own size
    capped = load_detector(Settings(detector_model=gdino_dir, device="cpu", detector_max_size=80))
    assert (capped.image_size["shortest_edge"], capped.image_size["longest_edge"]) == (80, 80)
    pixels = capped.processor.image_processor(images=image, size=capped.image_size, return_tensors="pt")
    assert max(pixels["pixel_values"].shape[-2:]) == 80
    capped.detect(image, ["cat"], 0.0, 0.0)  # still runs end to end
    roomy = load_detector(Settings(detector_model=gdino_dir, device="cpu", detector_max_size=5000))
    assert roomy.image_size == default.image_size, "a cap above the model's size must not upscale"
    with pytest.raises(ValueError, match="DETECTOR_MAX_SIZE"):
        load_detector(Settings(detector_model=gdino_dir, device="cpu", detector_max_size=-1))


def test_detector_max_size_changes_the_model_version():
    """Another input size gives other boxes: Label Studio must re-request predictions."""
    assert Settings(detector_max_size=800).model_version() != Settings().model_version()
