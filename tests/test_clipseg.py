"""CLIPSeg heatmaps and CLIP crop classification through the real loading path (tiny random
models saved with save_pretrained), heatmap thresholding, and the stuff-label convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache
from backend.labeling import LabelConfigError, parse_label_config
from backend.models.base import TextHeatmapSegmenter, ZeroShotClassifier
from backend.models.clip_classifier import ClipClassifier
from backend.models.clipseg import ClipSegHeatmaps, logits_to_heatmaps
from backend.models.loading import ModelLoadError
from backend.pipelines.everything import AutoParams, load_auto_models, predict_instances
from backend.pipelines.preannotate import PreannotateParams
from tests.fakes import BoxDetector, BoxFillSegmenter
from tests.tiny_clip_models import build_tiny_clip, build_tiny_clipseg

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="sky" mode="stuff"/><Label value="road" hint="road . street"/><Label value="cat"/>
  </BrushLabels>
</View>
"""


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def random_image(height: int = 50, width: int = 80, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_heatmap_threshold_gives_the_mask_at_the_original_resolution() -> None:
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :, :2] = 5.0  # left half
    logits[1, 1:3, 1:3] = 5.0  # centre quarter
    heat = logits_to_heatmaps(logits, (100, 60))
    assert heat.shape == (2, 100, 60) and heat.dtype == np.float32
    left = np.zeros((100, 60), bool)
    left[:, :30] = True
    assert np.array_equal(heat[0] > 0.5, left)
    centre = heat[1] > 0.5  # bilinear rounds the block's corners; its edges stay exact
    assert np.flatnonzero(centre[50]).tolist() == list(range(15, 45))
    assert np.flatnonzero(centre[:, 30]).tolist() == list(range(25, 75))
    assert not centre[:25].any() and not centre[75:].any() and not centre[:, :15].any() and not centre[:, 45:].any()
    assert heat.min() > 0.0 and heat.max() < 1.0
    with pytest.raises(ValueError, match="n, h, w"):
        logits_to_heatmaps(logits[0], (10, 10))


def test_tiny_clipseg_loads_and_gives_one_map_per_phrase(clipseg_dir: Path) -> None:
    model = ClipSegHeatmaps(str(clipseg_dir))
    assert isinstance(model, TextHeatmapSegmenter)
    image = random_image()
    heat = model.heatmaps(image, ["sky", "road"])
    assert heat.shape == (2, 50, 80) and 0.0 < heat.min() and heat.max() < 1.0
    assert not np.allclose(heat[0], heat[1])  # the phrase conditions the map
    alone = model.heatmaps(image, ["road"])
    np.testing.assert_allclose(alone[0], heat[1], atol=1e-5)  # batching phrases changes nothing
    with pytest.raises(ValueError, match="at least one phrase"):
        model.heatmaps(image, [])


def test_missing_models_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-clipseg-here"):
        ClipSegHeatmaps(str(tmp_path / "no-clipseg-here"))
    with pytest.raises(ModelLoadError, match="no-clip-here"):
        ClipClassifier(str(tmp_path / "no-clip-here"))


def test_tiny_clip_gives_probabilities_per_crop_in_any_batch_size(clip_dir: Path) -> None:
    images = [random_image(30, 20, seed) for seed in range(3)]
    big = ClipClassifier(str(clip_dir))
    assert isinstance(big, ZeroShotClassifier)
    probs = big.classify(images, ["cat", "dog", "background"])
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    small = ClipClassifier(str(clip_dir), batch_size=2)
    np.testing.assert_allclose(small.classify(images, ["cat", "dog", "background"]), probs, atol=1e-5)
    assert big.classify([], ["cat"]).shape == (0, 1)


def test_label_modes_come_from_the_environment_then_the_mode_attribute() -> None:
    assert parse_label_config(CONFIG).stuff_labels() == {"sky"}
    assert parse_label_config(CONFIG, label_modes={"road": "stuff"}).stuff_labels() == {"sky", "road"}
    assert parse_label_config(CONFIG, label_modes={"sky": "thing"}).stuff_labels() == frozenset()
    # the hint still only carries prompts
    assert parse_label_config(CONFIG).prompts_by_label()["road"] == ("road", "street")
    with pytest.raises(LabelConfigError, match="'blob'"):
        parse_label_config(CONFIG.replace('mode="stuff"', 'mode="blob"'))
    with pytest.raises(LabelConfigError, match="LABEL_MODES"):
        parse_label_config(CONFIG, label_modes={"cat": "object"})


def test_configured_clipseg_serves_stuff_labels_end_to_end(clipseg_dir: Path, clip_dir: Path) -> None:
    models = load_auto_models(Settings(clipseg_model=str(clipseg_dir), clip_model=str(clip_dir), device="cpu"))
    assert isinstance(models.heatmapper, ClipSegHeatmaps) and isinstance(models.classifier, ClipClassifier)
    project = parse_label_config(CONFIG)
    detector = BoxDetector({"road": [((0, 30, 80, 50), 0.9)]})
    image = random_image()
    found = predict_instances(
        "grounded",
        image,
        "sha",
        {},
        project,
        detector,
        BoxFillSegmenter(),
        EmbeddingCache(max_bytes=10**8),
        models,
        PreannotateParams(),
        AutoParams(clipseg_threshold=0.0),  # random weights: every probability is above 0
        "v1",
    )
    assert sorted(i.label for i in found) == ["road", "sky"]
    sky = next(i for i in found if i.label == "sky")
    assert sky.mask.all() and sky.box == (0.0, 0.0, 80.0, 50.0) and 0.0 < sky.score < 1.0
    assert detector.calls == [("road", "street", "cat")]  # the stuff label never reaches the detector
    assert load_auto_models(Settings()).heatmapper is None
