"""Shared test helpers: images as data URIs, label configs, an app wired to given models."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
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


def every_region_type_config(*extra_tags: str) -> str:
    """A config with every region type this backend writes (labels "cat" and "red car") and a
    smart keypoint control, plus ``extra_tags`` (e.g. a TextArea) inside the ``<View>``."""
    extra = "".join(f"  {tag}\n" for tag in extra_tags)
    return f"""
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="red car"/></BrushLabels>
  <BitmaskLabels name="bits" toName="image"><Label value="cat"/><Label value="red car"/></BitmaskLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="red car"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="cat"/><Label value="red car"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
{extra}</View>
"""


def check_every_region_type(regions: list[dict], width: int, height: int) -> None:
    """The regions a ``every_region_type_config`` project gets for one image: every output type,
    its labels, the image's size, scores in [0, 1] and masks that decode to non-empty pixels."""
    from backend.regions import decode_region_mask

    assert {r["type"] for r in regions} == {"brushlabels", "bitmasklabels", "polygonlabels", "rectanglelabels"}
    for region in regions:
        assert region["value"][region["type"]][0] in {"cat", "red car"}
        assert (region["original_width"], region["original_height"]) == (width, height)
        assert 0.0 <= region["score"] <= 1.0
        if region["type"] in ("brushlabels", "bitmasklabels"):
            mask = decode_region_mask(region)
            assert mask.shape == (height, width) and mask.any()


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


def keypoint(x: float, y: float, label: str | None = "cat", positive: bool | None = True, w=640, h=480) -> dict:
    """A smart KeyPointLabels click (control ``kp``) as Label Studio sends it in
    ``params.context.result``; ``label=None`` / ``positive=None`` leave those fields out."""
    value: dict = {"x": x, "y": y, "width": 0.3}
    if label:
        value["keypointlabels"] = [label]
    item = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0, "value": value}
    if positive is not None:
        item["is_positive"] = positive
    return item


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


def wait_for_models(client: FlaskClient, timeout_s: float) -> dict[str, Any]:
    """Poll ``/health`` while the app loads its models in the background (``create_app``
    returns at once); the last health body, whatever state it reached."""
    deadline = time.monotonic() + timeout_s
    health = client.get("/health").json
    while health["model_state"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
        health = client.get("/health").json
    return health


def ready_app(environ: Mapping[str, str], timeout_s: float = 120.0) -> Flask:
    """The app configured as a user would (environment variables, on the CPU in float32),
    once its real models have loaded: the start-up path a server goes through."""
    settings = Settings.from_env({"DEVICE": "cpu", "DTYPE": "float32", "MODEL_WAIT_S": str(timeout_s), **environ})
    app = create_app(settings)
    health = wait_for_models(app.test_client(), timeout_s)
    assert health["model_state"] == "ready", health
    return app
