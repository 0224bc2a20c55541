"""Test-only ``GSB_PREDICTOR_FACTORY`` target: a ``Predictor`` on the fake models with exact
geometry, built the way ``backend.app.default_predictor_factory`` builds the real one (so the
embedding cache honours ``EMBEDDING_CACHE_DIR``). CLI and worker subprocesses of the tests load
it by name; ``GSB_TEST_EMBED_DELAY_S`` slows each image down so a test can interrupt a run.
"""

from __future__ import annotations

import os

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache
from backend.images import ImageLoader
from backend.metrics import Metrics
from backend.predictor import Predictor
from tests.fakes import BoxDetector, BoxFillSegmenter

FACTORY = "tests.batch_predictor:fake_predictor"
CAT_BOX = (4.0, 2.0, 20.0, 14.0)  # x0, y0, x1, y1 in pixels of the 32x24 test images
CAT_SCORE = 0.9


def fake_predictor(settings: Settings, metrics: Metrics) -> Predictor:
    """Every image holds one "cat" at ``CAT_BOX``; the segmenter fills the box exactly."""
    detector = BoxDetector({"cat": [(CAT_BOX, CAT_SCORE)]})
    segmenter = BoxFillSegmenter(embed_delay_s=float(os.environ.get("GSB_TEST_EMBED_DELAY_S", "0")))
    cache = EmbeddingCache.from_settings(settings)
    return Predictor(settings, detector, segmenter, cache, ImageLoader(settings), metrics)
