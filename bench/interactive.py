"""Click latency through the real HTTP app (issue 3): SAM ViT-B with and without the embedding cache.

    .venv/bin/python -m bench.interactive [--clicks 60] [--naive 2] [--dtype auto]

SAM ViT-B (random weights, :mod:`bench.common`) is loaded through ``registry.load_segmenter``
and served by the real Flask app (``backend.app.create_app``) on a loopback port with
werkzeug's threaded server; a click is the ``/predict`` body Label Studio sends for a smart
KeyPointLabels click (``params.context.result``), on a 1024x768 JPEG that the backend reads
from Local Storage (``/data/local-files/?d=...``), answered with a brush RLE region. No
detector is loaded: clicks never use it.

Measured in one run:

* cold click: the first click on the image (encoder forward + decoder + everything else);
* warm clicks over HTTP (p50/p95), alternated with the same click through
  ``Predictor.predict_interactive`` in-process (no HTTP), ``segment()`` in-process (decoder +
  upsampling), the decoder forward alone (prompt encoder + mask decoder on the cached
  embedding) as transformers runs it ("raw") and folded as ``segment()`` runs it
  (:mod:`backend.models.sam_decoder`), and the image load (read, decode, hash): what each
  layer adds;
* naive clicks, spread between the warm ones: the same app with a zero-size embedding cache,
  so every click runs the encoder again, as backends without a cache do.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from werkzeug.serving import make_server

from backend.app import create_app
from backend.config import Settings
from backend.embedding_cache import EmbeddingCache, cache_key
from backend.images import ImageLoader
from backend.metrics import Metrics
from backend.models.base import PromptSet
from backend.models.loading import apply_torch_threads, inference_context
from backend.models.registry import load_segmenter
from backend.models.sam import SamSegmenter
from backend.predictor import Credentials, Predictor
from bench.common import (
    Row,
    alternate,
    ensure_models,
    finish,
    load_average,
    machine,
    percentile,
    print_machine,
    ratio,
    summary,
    synthetic_image,
    timed,
)

WIDTH, HEIGHT = 1024, 768
LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>
"""
TARGETS = {"warm_p50_ms": 40.0, "naive_over_warm": 100.0}


class NoDetector:
    """Stands in for the detector, which a click never calls."""

    model_id = "bench/no-detector"

    def detect(self, *args: Any, **kwargs: Any) -> list:
        raise AssertionError("a click must not run the detector")


def serve(settings: Settings, predictor: Predictor) -> tuple[str, Callable[[], None]]:
    """The real app on a free loopback port, serving ``predictor``; returns (base URL, stop)."""
    server = make_server("127.0.0.1", 0, create_app(settings, lambda s, metrics: predictor), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/health", timeout=5).json()["model_state"] != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError("the app did not report ready within 60 s")
        time.sleep(0.05)
    return url, server.shutdown


def click_body(image_name: str, task_id: int, x: float, y: float) -> dict[str, Any]:
    """A smart-keypoint interactive request as Label Studio sends it (percent coordinates)."""
    keypoint = {
        "id": f"k{task_id}",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "is_positive": True,
        "value": {"x": 100 * x / WIDTH, "y": 100 * y / HEIGHT, "width": 0.6, "keypointlabels": ["cat"]},
    }
    return {
        "tasks": [{"id": task_id, "data": {"image": f"/data/local-files/?d={image_name}"}}],
        "project": "1.1700000000",
        "label_config": LABEL_CONFIG,
        "params": {"login": None, "password": None, "context": {"result": [keypoint]}},
    }


class Clicker:
    """Posts clicks at random points and checks that a brush region comes back."""

    def __init__(self, session: requests.Session, seed: int = 0) -> None:
        self.session = session
        self.rng = np.random.default_rng(seed)
        self.regions = 0
        self.response_bytes: list[int] = []

    def point(self) -> tuple[float, float]:
        return float(self.rng.uniform(0, WIDTH)), float(self.rng.uniform(0, HEIGHT))

    def click(self, url: str, image_name: str, task_id: int) -> None:
        response = self.session.post(f"{url}/predict", json=click_body(image_name, task_id, *self.point()), timeout=600)
        response.raise_for_status()
        result = response.json()["results"][0]
        if "error" in result:
            raise RuntimeError(result["error"])
        self.regions += len(result["result"])
        self.response_bytes.append(len(response.content))


def decoder_forward(
    decoder: torch.nn.Module, segmenter: SamSegmenter, embedding_tensor: torch.Tensor, rng: np.random.Generator
) -> Callable[[], Any]:
    """One decoder forward alone (prompt encoder + mask decoder), one positive point, three
    candidates: ``decoder`` is the model (transformers' own forward) or its folded decoder."""
    scale = 1024 / WIDTH  # the padded SAM frame: the longest side becomes 1024

    def run() -> Any:
        point = torch.tensor([[[[rng.uniform(0, WIDTH) * scale, rng.uniform(0, HEIGHT) * scale]]]])
        with inference_context(segmenter.device, segmenter.dtype):
            return decoder(
                image_embeddings=embedding_tensor,
                input_points=point,
                input_labels=torch.ones((1, 1, 1), dtype=torch.int64),
                multimask_output=True,
            )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=60, help="warm clicks (and as many of each in-process variant)")
    parser.add_argument("--naive", type=int, default=2, help="clicks without a cache (an encoder forward each)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    info = machine()
    print_machine(info)
    paths = ensure_models()
    folder = Path(tempfile.mkdtemp(prefix="bench-interactive-"))
    image = synthetic_image(WIDTH, HEIGHT)
    image.save(folder / "bench.jpg", quality=90)
    settings = Settings(
        segmenter_model=str(paths.segmenter),
        device="cpu",
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        allow_local_files=True,
        local_files_root=str(folder),
    )
    apply_torch_threads(settings.torch_threads)
    segmenter = load_segmenter(settings)
    cache = EmbeddingCache.from_settings(settings)
    predictor = Predictor(settings, NoDetector(), segmenter, cache, ImageLoader(settings), Metrics())
    warm_url, stop_warm = serve(settings, predictor)
    uncached = Predictor(settings, NoDetector(), segmenter, EmbeddingCache(max_bytes=0), ImageLoader(settings))
    naive_url, stop_naive = serve(settings, uncached)
    session = requests.Session()
    clicker = Clicker(session)

    cold_s, _ = timed(lambda: clicker.click(warm_url, "bench.jpg", 1))
    print(f"cold click (encoder + decoder + HTTP): {cold_s:.2f} s  load {load_average()}", flush=True)

    loader = ImageLoader(settings)
    task = {"id": 1, "data": {"image": "/data/local-files/?d=bench.jpg"}}
    loaded = loader.load(task, "image")
    embedding = cache.peek(cache_key(loaded.sha256, segmenter.model_id))
    assert embedding is not None, "the cold click did not fill the cache"
    rng = np.random.default_rng(1)

    def segment_in_process() -> None:
        x, y = float(rng.uniform(0, WIDTH)), float(rng.uniform(0, HEIGHT))
        segmenter.segment(embedding, [PromptSet(points=[(x, y)], point_labels=[1])], multimask=True)

    def predict_in_process() -> None:
        body = click_body("bench.jpg", 1, *clicker.point())
        predictor.predict_interactive(body["tasks"][0], body["params"]["context"], LABEL_CONFIG, Credentials())

    variants = {
        "warm click over HTTP": lambda: clicker.click(warm_url, "bench.jpg", 1),
        "predict_interactive() in-process": predict_in_process,
        "segment() in-process": segment_in_process,
        "raw decoder forward": decoder_forward(segmenter.model, segmenter, embedding.tensors["image_embeddings"], rng),
        "folded decoder forward": decoder_forward(
            segmenter.decoder_module, segmenter, embedding.tensors["image_embeddings"], rng
        ),
        "image load (read, decode, hash)": lambda: loader.load(task, "image"),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    naive: list[float] = []
    blocks = max(args.naive, 1)
    for block in range(blocks):
        for name, values in alternate(variants, args.clicks // blocks).items():
            samples[name] += values
        if block < args.naive:
            seconds, _ = timed(lambda: clicker.click(naive_url, "bench.jpg", 2))
            naive.append(seconds)
            print(f"naive click (no cache): {seconds:.2f} s  load {load_average()}", flush=True)
    stop_warm()
    stop_naive()

    stats = {name: summary(values) for name, values in samples.items()}
    for name, values in stats.items():
        print(f"{name}: {values}", flush=True)
    warm = samples["warm click over HTTP"]
    warm_p50, warm_p95 = percentile(warm, 50), percentile(warm, 95)
    raw_p50 = percentile(samples["raw decoder forward"], 50)
    folded_p50 = percentile(samples["folded decoder forward"], 50)
    naive_p50 = float(np.median(naive)) if naive else float("nan")
    rows = [
        Row("cold click (encoder + decoder), HTTP", "", f"{cold_s:.2f} s"),
        Row(f"warm click p50 over HTTP ({len(warm)} clicks)", f"<= {TARGETS['warm_p50_ms']:.0f} ms",
            f"{1000 * warm_p50:.0f} ms", 1000 * warm_p50 <= TARGETS["warm_p50_ms"]),
        Row("warm click p95 over HTTP", "", f"{1000 * warm_p95:.0f} ms"),
        Row("same click in-process, no HTTP (predict_interactive) p50", "",
            f"{1000 * percentile(samples['predict_interactive() in-process'], 50):.0f} ms"),
        Row("segment() in-process (decoder + upsampling) p50", "",
            f"{1000 * percentile(samples['segment() in-process'], 50):.0f} ms"),
        Row("raw decoder forward p50 (transformers' prompt encoder + mask decoder)", "", f"{1000 * raw_p50:.0f} ms"),
        Row("our folded decoder forward p50 (what segment() runs)", "", f"{1000 * folded_p50:.0f} ms"),
        Row("folded / raw decoder", "", f"{ratio(folded_p50, raw_p50)}x"),
        Row("warm click / raw decoder (what HTTP, image, upsampling, RLE add)", "", f"{ratio(warm_p50, raw_p50)}x"),
        Row(f"naive click, no cache ({len(naive)} clicks)", "", f"{naive_p50:.2f} s"),
        Row("naive / warm", f">= {TARGETS['naive_over_warm']:.0f}x", f"{ratio(naive_p50, warm_p50)}x",
            naive_p50 / warm_p50 >= TARGETS["naive_over_warm"]),
    ]
    results = {
        "settings": vars(args),
        "dtype": str(segmenter.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cold_click_s": round(cold_s, 3),
        "naive_click_s": [round(s, 3) for s in naive],
        "variants": stats,
        "regions_returned": clicker.regions,
        "response_bytes_median": int(np.median(clicker.response_bytes)),
    }
    finish("interactive", info, rows, results)


if __name__ == "__main__":
    main()
