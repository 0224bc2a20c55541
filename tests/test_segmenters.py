"""Segmenter adapters on tiny random models saved to a temp dir and loaded by path through
``registry.load_segmenter`` (the same from_pretrained path a hub id takes).

The reference for every numeric check is the library's own full path: the transformers
model's forward on ``pixel_values`` + processor-made prompts, or the official
``SamPredictor`` for ``.pth`` checkpoints. The image is 64x48 (non-square), so swapped
width/height in any coordinate or mask mapping would show.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.build_sam import _build_sam
from transformers import BertConfig

from backend.config import Settings
from backend.models.base import PromptSet, Segmenter
from backend.models.grounding_dino import GroundingDinoDetector
from backend.models.loading import ModelLoadError
from backend.models.owlv2 import Owlv2Detector
from backend.models.registry import ModelBundle, load_detector, load_models, load_segmenter
from backend.models.sam import SamSegmenter
from backend.models.sam_checkpoint import SamCheckpointSegmenter, encoder_shape
from tests.tiny_models import build_tiny_grounding_dino, build_tiny_mm_grounding_dino, build_tiny_owlv2
from tests.tiny_sam_models import (
    build_tiny_sam,
    build_tiny_sam2,
    build_tiny_sam2_video,
    build_tiny_sam3_tracker,
    build_tiny_sam_hq,
)

WIDTH, HEIGHT = 64, 48
BOXES = [(2.0, 3.0, 30.0, 40.0), (10.0, 10.0, 60.0, 45.0), (33.0, 0.0, 64.0, 20.0)]
CLICKS = [(10.0, 12.0), (40.0, 30.0)]
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sam": build_tiny_sam,
    "sam_hq": build_tiny_sam_hq,
    "sam2": build_tiny_sam2,
    "sam3_tracker": build_tiny_sam3_tracker,
}
PADDED = {"sam", "sam_hq"}  # longest-side resize + bottom/right padding; the others squash


def settings_for(model: str | Path, **overrides: object) -> Settings:
    # batches of 16 (the CUDA default; CPU defaults to one box per call): these tests check that
    # batched decoder calls give each prompt set its own answer
    values: dict[str, object] = {"device": "cpu", "dtype": "float32", "segmenter_batch_size": 16, **overrides}
    return Settings(segmenter_model=str(model), **values)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def left_half() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[:, : WIDTH // 2] = True
    return mask


@pytest.fixture(scope="module", params=list(BUILDERS))
def loaded(request, tmp_path_factory, image):
    """(model_type, segmenter loaded through the registry, embedding of ``image``)."""
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    segmenter = load_segmenter(settings_for(folder))
    return request.param, segmenter, segmenter.embed(image)


def count_calls(module: torch.nn.Module) -> list[int]:
    """Count forwards of ``module`` (instance-level wrap, undone when the module is dropped)."""
    calls: list[int] = []
    original = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.forward = counted
    return calls


def full_forward(segmenter: SamSegmenter, image: Image.Image, multimask: bool, **prompts):
    """The model's own uncached path: processor on image + prompts, forward on pixel_values."""
    inputs = segmenter.processor(images=image, return_tensors="pt", **prompts)
    keys = ("pixel_values", "input_points", "input_labels", "input_boxes")
    with torch.inference_mode():
        return inputs, segmenter.model(**{k: inputs[k] for k in keys if k in inputs}, multimask_output=multimask)


def post_process(segmenter: SamSegmenter, logits: torch.Tensor, inputs) -> np.ndarray:
    """The processor's mask upsampling (pad-aware for SAM/SAM-HQ), for (h, w) logits."""
    args = [[logits[None, None]], inputs["original_sizes"]]
    if segmenter.model_type in PADDED:
        args.append(inputs["reshaped_input_sizes"])
    return segmenter.processor.post_process_masks(*args)[0][0, 0].numpy()


# -- transformers SAM family ------------------------------------------------------------------


def test_loads_by_path_and_segments_three_boxes_in_one_decoder_call(loaded):
    model_type, segmenter, embedding = loaded
    assert isinstance(segmenter, SamSegmenter) and isinstance(segmenter, Segmenter)
    assert segmenter.model_type == model_type
    assert embedding.image_size == (HEIGHT, WIDTH)
    assert embedding.nbytes > 0
    calls = count_calls(segmenter.model.prompt_encoder)  # once per decoder call, folded or not

    predictions = segmenter.segment(embedding, [PromptSet(box=box) for box in BOXES])

    assert len(calls) == 1
    assert len(predictions) == 3
    for prediction in predictions:
        assert prediction.mask.shape == (HEIGHT, WIDTH) and prediction.mask.dtype == bool
        assert prediction.low_res_logits.shape == segmenter.low_res_size
        assert prediction.low_res_logits.dtype == np.float32
    # each box got its own answer (a broadcast or order mix-up would repeat one)
    assert np.abs(predictions[0].low_res_logits - predictions[1].low_res_logits).max() > 1e-3


def test_cached_embedding_equals_full_forward_for_boxes(loaded, image):
    _, segmenter, embedding = loaded
    predictions = segmenter.segment(embedding, [PromptSet(box=box) for box in BOXES])

    inputs, output = full_forward(segmenter, image, multimask=False, input_boxes=[[list(b) for b in BOXES]])

    for i, prediction in enumerate(predictions):
        expected = output.pred_masks[0, i, 0]
        np.testing.assert_allclose(prediction.low_res_logits, expected.numpy(), atol=1e-4)
        assert prediction.score == pytest.approx(float(output.iou_scores[0, i, 0]), abs=1e-4)
        np.testing.assert_array_equal(prediction.mask, post_process(segmenter, expected, inputs))


def test_multimask_keeps_the_candidate_with_the_best_predicted_iou(loaded, image):
    _, segmenter, embedding = loaded
    prompt = PromptSet(points=CLICKS, point_labels=[1, 0])

    prediction = segmenter.segment(embedding, [prompt], multimask=True)[0]

    inputs, output = full_forward(
        segmenter,
        image,
        multimask=True,
        input_points=[[[list(p) for p in CLICKS]]],
        input_labels=[[[1, 0]]],
    )
    ious = output.iou_scores[0, 0]
    assert ious.shape == (3,)
    assert float(ious.max() - ious.min()) > 1e-4, "candidates must differ for the choice to matter"
    best = int(ious.argmax())
    assert prediction.score == pytest.approx(float(ious[best]), abs=1e-4)
    np.testing.assert_allclose(prediction.low_res_logits, output.pred_masks[0, 0, best].numpy(), atol=1e-4)
    others = [i for i in range(3) if i != best]
    assert all(np.abs(prediction.low_res_logits - output.pred_masks[0, 0, i].numpy()).max() > 1e-3 for i in others)


def test_mask_prompt_changes_the_answer_and_matches_full_forward(loaded, image, left_half):
    _, segmenter, embedding = loaded
    click = PromptSet(points=CLICKS[:1], point_labels=[1])
    logits = segmenter.mask_to_logits(left_half)

    plain = segmenter.segment(embedding, [click])[0]
    with_mask = segmenter.segment(embedding, [PromptSet(points=CLICKS[:1], point_labels=[1], mask_logits=logits)])[0]
    with_prior = segmenter.segment(embedding, [PromptSet(points=CLICKS[:1], point_labels=[1], prior_mask=left_half)])[0]

    assert np.abs(with_mask.low_res_logits - plain.low_res_logits).max() > 1e-3
    np.testing.assert_allclose(with_prior.low_res_logits, with_mask.low_res_logits, atol=1e-6)
    inputs = segmenter.processor(
        images=image, input_points=[[[list(CLICKS[0])]]], input_labels=[[[1]]], return_tensors="pt"
    )
    with torch.inference_mode():
        output = segmenter.model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            input_masks=torch.from_numpy(logits)[None, None],
            multimask_output=False,
        )
    np.testing.assert_allclose(with_mask.low_res_logits, output.pred_masks[0, 0, 0].numpy(), atol=1e-4)


def test_each_prompt_set_in_a_batch_keeps_its_own_mask_prompt(loaded, left_half):
    """Mask prompts are per prompt set: batched answers equal one-by-one answers."""
    _, segmenter, embedding = loaded
    prompts = [
        PromptSet(points=CLICKS[:1], point_labels=[1], prior_mask=left_half),
        PromptSet(points=CLICKS[:1], point_labels=[1], prior_mask=~left_half),
    ]
    batched = segmenter.segment(embedding, prompts)
    single = [segmenter.segment(embedding, [prompt])[0] for prompt in prompts]
    for one, other in zip(batched, single, strict=True):
        np.testing.assert_allclose(one.low_res_logits, other.low_res_logits, atol=1e-5)
    assert np.abs(batched[0].low_res_logits - batched[1].low_res_logits).max() > 1e-3


def test_mixed_prompts_are_grouped_chunked_and_returned_in_order(loaded):
    _, segmenter, embedding = loaded
    prompts = [
        PromptSet(box=BOXES[0]),
        PromptSet(points=CLICKS[:1], point_labels=[1]),
        PromptSet(box=BOXES[1]),
        PromptSet(points=CLICKS, point_labels=[1, 0], box=BOXES[2]),
        PromptSet(box=BOXES[2]),
    ]
    single = [segmenter.segment(embedding, [prompt])[0] for prompt in prompts]
    saved = segmenter.max_batch_size
    segmenter.max_batch_size = 2
    calls = count_calls(segmenter.model.prompt_encoder)  # once per decoder call, folded or not
    try:
        batched = segmenter.segment(embedding, prompts)
    finally:
        segmenter.max_batch_size = saved
    # 3 boxes -> chunks of 2 + 1; the click group and the points+box group: one call each
    assert len(calls) == 4
    for one, other in zip(batched, single, strict=True):
        np.testing.assert_allclose(one.low_res_logits, other.low_res_logits, atol=1e-5)


def test_candidates_are_all_multimask_answers_with_the_image_extent(loaded):
    model_type, segmenter, embedding = loaded
    prompt = PromptSet(points=CLICKS, point_labels=[1, 0])

    [candidates] = segmenter.segment_candidates(embedding, [prompt])
    best = segmenter.segment(embedding, [prompt], multimask=True)[0]

    low_h, low_w = segmenter.low_res_size
    assert candidates.logits.shape == (3, low_h, low_w) and candidates.scores.shape == (3,)
    top = int(candidates.scores.argmax())
    np.testing.assert_allclose(candidates.logits[top], best.low_res_logits, atol=1e-5)
    # 64x48 inside SAM's padded square covers 3/4 of the rows; SAM 2/3 stretch over all
    expected = (low_h * 3 / 4, float(low_w)) if model_type in PADDED else (float(low_h), float(low_w))
    assert candidates.image_extent == pytest.approx(expected)


def test_low_res_mask_conversion_keeps_shape_and_orientation(loaded, image, left_half):
    model_type, segmenter, _ = loaded
    logits = segmenter.mask_to_logits(left_half)
    assert logits.shape == segmenter.low_res_size and logits.dtype == np.float32

    low_h, low_w = segmenter.low_res_size
    # where the image lies inside the low-res frame: SAM pads the 64x48 image to a square
    # at the bottom (content is 3/4 of the height), SAM 2/3 stretch it over the whole frame
    content_h = low_h * 3 // 4 if model_type in PADDED else low_h
    assert (logits[: content_h - 1, : low_w // 2 - 1] > 0).all()
    assert (logits[:, low_w // 2 + 1 :] < 0).all()
    assert (logits[content_h + 1 :, :] < 0).all()

    inputs = segmenter.processor(images=image, return_tensors="pt")
    back = post_process(segmenter, torch.from_numpy(logits), inputs)
    assert back.shape == (HEIGHT, WIDTH)
    assert (back == left_half).mean() > 0.97


def test_prompt_errors_are_clear(loaded):
    _, segmenter, embedding = loaded
    with pytest.raises(ValueError, match="point labels"):
        segmenter.segment(embedding, [PromptSet(points=CLICKS, point_labels=[1])])
    with pytest.raises(ValueError, match="at least one point or a box"):
        segmenter.segment(embedding, [PromptSet()])
    with pytest.raises(ValueError, match="mask_logits has shape"):
        segmenter.segment(embedding, [PromptSet(box=BOXES[0], mask_logits=np.zeros((7, 7), np.float32))])


def test_missing_path_raises_model_load_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-sam"
    with pytest.raises(ModelLoadError, match="no-such-sam"):
        load_segmenter(settings_for(missing))
    with pytest.raises(ModelLoadError, match="sam_vit_b_missing.pth"):
        load_segmenter(settings_for(tmp_path / "sam_vit_b_missing.pth"))


def test_folder_of_another_model_type_is_refused(tmp_path):
    folder = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="'bert' model; supported segmenters"):
        load_segmenter(settings_for(folder))


def test_checkpoint_missing_weights_is_refused_not_left_random(tmp_path):
    """A folder whose weights do not fit the class would otherwise run on random tensors."""
    folder = build_tiny_sam(tmp_path / "sam")
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if not k.startswith("mask_decoder.")}
    save_file(dropped, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="mask_decoder"):
        load_segmenter(settings_for(folder))


def test_video_layout_folder_loads_into_the_image_class(tmp_path, image):
    """The hub's SAM 2.1 repos are ``sam2_video``; AutoModel would build the video model."""
    folder = build_tiny_sam2_video(tmp_path)
    segmenter = load_segmenter(settings_for(folder))
    assert segmenter.model_type == "sam2_video"
    assert type(segmenter.model).__name__ == "Sam2Model"
    prediction = segmenter.segment(segmenter.embed(image), [PromptSet(box=BOXES[0])])[0]
    assert prediction.mask.shape == (HEIGHT, WIDTH)


def test_bfloat16_autocast_runs_and_stays_close_to_float32(tmp_path, image):
    folder = build_tiny_sam2(tmp_path / "sam2")
    prompt = PromptSet(points=CLICKS, point_labels=[1, 0], box=BOXES[0])
    answers = {}
    for dtype in ("float32", "bfloat16"):
        segmenter = load_segmenter(settings_for(folder, dtype=dtype))
        embedding = segmenter.embed(image)
        answers[dtype] = (embedding, segmenter.segment(embedding, [prompt], multimask=True)[0])
    (emb32, fp32), (emb16, bf16) = answers["float32"], answers["bfloat16"]
    # autocast leaves some feature levels in bfloat16: the cache holds fewer bytes
    assert emb16.tensors["image_embeddings"][0].dtype == torch.bfloat16
    assert emb16.nbytes < emb32.nbytes
    assert bf16.low_res_logits.dtype == np.float32
    np.testing.assert_allclose(bf16.low_res_logits, fp32.low_res_logits, atol=0.05)
    assert (bf16.mask == fp32.mask).mean() > 0.95


def test_concurrent_calls_give_the_sequential_answers(tmp_path, image):
    segmenter = load_segmenter(settings_for(build_tiny_sam3_tracker(tmp_path / "tracker")))
    embedding = segmenter.embed(image)
    prompts = [[PromptSet(box=box)] for box in BOXES] * 2
    expected = [segmenter.segment(embedding, p)[0].low_res_logits for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        embeddings = list(pool.map(lambda _: segmenter.embed(image), range(2)))
        got = list(pool.map(lambda p: segmenter.segment(embedding, p)[0].low_res_logits, prompts))
    for one, other in zip(got, expected, strict=True):
        np.testing.assert_allclose(one, other, atol=1e-6)
    reference = embedding.tensors["image_embeddings"]
    for other in embeddings:
        for level, expected_level in zip(other.tensors["image_embeddings"], reference, strict=True):
            torch.testing.assert_close(level, expected_level)


# -- official segment-anything checkpoints ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A real segment-anything ``Sam`` built by the package's own builder with a tiny ViT
    (the 256-wide prompt encoder and decoder are the released ones), saved as a .pth."""
    torch.manual_seed(0)
    reference = _build_sam(
        encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1]
    ).eval()
    path = tmp_path_factory.mktemp("sam_pth") / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    return path, reference


@pytest.fixture(scope="module")
def checkpoint_loaded(tiny_checkpoint, image):
    path, reference = tiny_checkpoint
    segmenter = load_segmenter(settings_for(path))
    predictor = SamPredictor(reference)
    predictor.set_image(np.asarray(image))
    return segmenter, segmenter.embed(image), predictor


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_released_variants_are_recognised_from_state_dict_shapes(variant):
    with torch.device("meta"):  # shapes only: no 90M-630M parameter allocation
        state_dict = sam_model_registry[variant]().state_dict()
    assert encoder_shape(state_dict).variant == variant


def test_pth_loads_through_registry_and_matches_sam_predictor(checkpoint_loaded):
    segmenter, embedding, predictor = checkpoint_loaded
    assert isinstance(segmenter, SamCheckpointSegmenter) and isinstance(segmenter, Segmenter)
    assert segmenter.variant.startswith("custom ViT (dim 32, depth 2, heads 2)")
    torch.testing.assert_close(embedding.tensors["image_embeddings"], predictor.features)
    calls = count_calls(segmenter.model.mask_decoder)

    predictions = segmenter.segment(embedding, [PromptSet(box=box) for box in BOXES])

    assert len(calls) == 1
    for box, prediction in zip(BOXES, predictions, strict=True):
        masks, scores, low_res = predictor.predict(box=np.array(box), multimask_output=False)
        assert prediction.mask.shape == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(prediction.mask, masks[0])
        np.testing.assert_allclose(prediction.low_res_logits, low_res[0], atol=1e-4)
        assert prediction.score == pytest.approx(float(scores[0]), abs=1e-4)
    assert np.abs(predictions[0].low_res_logits - predictions[1].low_res_logits).max() > 1e-3


def test_pth_multimask_and_mask_prompt_match_sam_predictor(checkpoint_loaded, left_half):
    segmenter, embedding, predictor = checkpoint_loaded
    coords, labels = np.array(CLICKS), np.array([1, 0])

    best = segmenter.segment(embedding, [PromptSet(points=CLICKS, point_labels=[1, 0])], multimask=True)[0]
    _, scores, low_res = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=True)
    assert float(scores.max() - scores.min()) > 1e-4
    assert best.score == pytest.approx(float(scores.max()), abs=1e-4)
    np.testing.assert_allclose(best.low_res_logits, low_res[int(scores.argmax())], atol=1e-4)

    logits = segmenter.mask_to_logits(left_half)
    refined = segmenter.segment(embedding, [PromptSet(points=CLICKS, point_labels=[1, 0], prior_mask=left_half)])[0]
    _, _, expected = predictor.predict(
        point_coords=coords, point_labels=labels, mask_input=logits[None], multimask_output=False
    )
    np.testing.assert_allclose(refined.low_res_logits, expected[0], atol=1e-4)
    assert np.abs(refined.low_res_logits - best.low_res_logits).max() > 1e-3


def test_pth_candidates_match_sam_predictor(checkpoint_loaded):
    segmenter, embedding, predictor = checkpoint_loaded
    [candidates] = segmenter.segment_candidates(embedding, [PromptSet(points=CLICKS, point_labels=[1, 0])])
    _, scores, low_res = predictor.predict(
        point_coords=np.array(CLICKS), point_labels=np.array([1, 0]), multimask_output=True
    )
    np.testing.assert_allclose(candidates.logits, low_res, atol=1e-4)
    np.testing.assert_allclose(candidates.scores, scores, atol=1e-4)
    assert candidates.image_extent == pytest.approx((192.0, 256.0))


def test_pth_low_res_conversion_round_trips_through_sam_postprocess(checkpoint_loaded, left_half):
    segmenter, embedding, _ = checkpoint_loaded
    logits = segmenter.mask_to_logits(left_half)
    assert logits.shape == (256, 256)
    back = segmenter.model.postprocess_masks(
        torch.from_numpy(logits)[None, None], embedding.tensors["input_size"], (HEIGHT, WIDTH)
    )[0, 0].numpy()
    assert ((back > 0) == left_half).mean() > 0.97
    assert (logits[:, 130:] < 0).all() and (logits[195:, :] < 0).all()


def test_wrapped_state_dict_loads_and_foreign_pth_is_refused(tiny_checkpoint, tmp_path):
    path, reference = tiny_checkpoint
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": reference.state_dict(), "epoch": 3}, wrapped)
    assert isinstance(load_segmenter(settings_for(wrapped)), SamCheckpointSegmenter)

    foreign = tmp_path / "mobile_sam.pth"
    torch.save({"image_encoder.layers.0.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ModelLoadError, match="mobile_sam.pth.*not a segment-anything ViT"):
        load_segmenter(settings_for(foreign))

    truncated = tmp_path / "sam_vit_b_truncated.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if "mask_decoder" not in k}, truncated)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_segmenter(settings_for(truncated))


# -- detectors and the bundle --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (build_tiny_grounding_dino, GroundingDinoDetector),
        (build_tiny_mm_grounding_dino, GroundingDinoDetector),
        (build_tiny_owlv2, Owlv2Detector),
    ],
)
def test_load_detector_picks_the_adapter_from_model_type(builder, expected, tmp_path):
    folder = builder(tmp_path / "detector")
    detector = load_detector(Settings(detector_model=str(folder), device="cpu", dtype="float32"))
    assert type(detector) is expected


def test_load_models_bundles_both_and_times_them(tmp_path, tiny_checkpoint):
    detector_dir = build_tiny_owlv2(tmp_path / "owlv2")
    bundle = load_models(
        Settings(detector_model=str(detector_dir), segmenter_model=str(tiny_checkpoint[0]), device="cpu")
    )
    assert isinstance(bundle, ModelBundle)
    assert isinstance(bundle.detector, Owlv2Detector)
    assert isinstance(bundle.segmenter, SamCheckpointSegmenter)
    assert set(bundle.load_seconds) == {"detector", "segmenter"}
    assert bundle.total_load_seconds > 0


def test_a_segmenter_folder_is_not_a_detector(tmp_path):
    folder = build_tiny_sam(tmp_path / "sam")
    with pytest.raises(ModelLoadError, match="'sam' model; supported detectors"):
        load_detector(Settings(detector_model=str(folder), device="cpu"))
