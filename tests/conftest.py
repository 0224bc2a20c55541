"""Shared test helpers: images as data URIs, label configs, an app wired to given models."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from backend.app import create_app  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.embedding_cache import EmbeddingCache  # noqa: E402
from backend.images import ImageLoader  # noqa: E402
from backend.metrics import Metrics  # noqa: E402
from backend.models.base import Detector, Segmenter  # noqa: E402
from backend.predictor import Predictor  # noqa: E402

CONFIG_ALL_OUTPUTS = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="cat"/><Label value="dog"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat"/><Label value="dog"/>
  </PolygonLabels>
  <RectangleLabels name="rect" toName="image">
    <Label value="cat"/><Label value="dog"/>
  </RectangleLabels>
</View>
"""


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (120, 60, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[..., 0] = color[0]
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def image_task(task_id: int, width: int, height: int) -> dict:
    return {"id": task_id, "data": {"image": data_uri(png_bytes(width, height))}}


def build_predictor(
    settings: Settings, detector: Detector, segmenter: Segmenter, metrics: Metrics | None = None
) -> Predictor:
    cache = EmbeddingCache(max_bytes=settings.embedding_cache_mb * 1024 * 1024)
    return Predictor(settings, detector, segmenter, cache, ImageLoader(settings), metrics)


@pytest.fixture
def make_client() -> Callable:
    """``make_client(settings, detector, segmenter, load_delay_s=0)`` -> (Flask test client, app)."""

    def factory(settings: Settings, detector: Detector, segmenter: Segmenter, load_delay_s: float = 0.0):
        def load(s: Settings, metrics: Metrics) -> Predictor:
            time.sleep(load_delay_s)
            return build_predictor(s, detector, segmenter, metrics)

        app = create_app(settings, load)
        return app.test_client(), app

    return factory
