"""Everything-mode time per image on CPU with a real-size SAM ViT-B (random weights).

    .venv/bin/python bench/everything.py [--points-per-side 32] [--size 1024x768]

``SamModel(SamConfig())`` is ViT-B sized (the facebook/sam-vit-base architecture); it is
saved with ``save_pretrained`` and loaded back through ``SamSegmenter``, the production path.
Random weights decide nothing about speed, but they do decide how many candidates pass the
filters (which sets the post-processing cost), so two runs are made on one cached embedding:

* ``default``: segment-anything's thresholds, at ``--points-per-side`` (32 = the real grid);
* ``worst``: every candidate kept (both thresholds 0) on a smaller grid
  (``--worst-points-per-side``); its per-candidate post-processing time, times 3 x the full
  grid's points, bounds the post-processing of an image where everything passes.

Decoder time is measured around ``segment_candidates``; post-processing is the rest of
``generate_masks`` (filters, upsampling of kept masks, RLE, NMS). Prints the CPU (timings from
different CPUs are not comparable) and writes bench/results/everything.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

from backend.embedding_cache import EmbeddingCache, cache_key
from backend.models.base import ImageEmbedding, MaskCandidates, PromptSet
from backend.models.loading import describe_cpu, resolve_dtype
from backend.models.sam import SamSegmenter
from backend.pipelines.everything import EverythingParams, generate_masks

RESULTS = Path(__file__).parent / "results" / "everything.json"


class TimedSegmenter:
    """Forwards to a segmenter and adds up the wall time of its decoder calls."""

    def __init__(self, inner: SamSegmenter) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.decoder_s = 0.0
        self.candidates = 0

    def embed(self, image: Image.Image) -> ImageEmbedding:
        return self.inner.embed(image)

    def segment(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet], multimask: bool = False) -> list:
        return self.inner.segment(embedding, prompts, multimask)

    def segment_candidates(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]) -> list[MaskCandidates]:
        start = time.perf_counter()
        found = self.inner.segment_candidates(embedding, prompts)
        self.decoder_s += time.perf_counter() - start
        self.candidates += sum(len(c.scores) for c in found)
        return found


def _run(segmenter: TimedSegmenter, image: Image.Image, cache: EmbeddingCache, params: EverythingParams) -> dict:
    segmenter.decoder_s, segmenter.candidates = 0.0, 0
    start = time.perf_counter()
    masks = generate_masks(image, "bench-image", segmenter, cache, params)
    total = time.perf_counter() - start
    points = params.points_per_side**2
    return {
        "points": points,
        "total_s": round(total, 3),
        "decoder_s": round(segmenter.decoder_s, 3),
        "post_s": round(total - segmenter.decoder_s, 3),
        "decoder_ms_per_point": round(1000 * segmenter.decoder_s / points, 2),
        "candidates": segmenter.candidates,
        "masks": len(masks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--worst-points-per-side", type=int, default=8)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--decoder-batch", type=int, default=16, help="SEGMENTER_BATCH_SIZE")
    parser.add_argument("--size", default="1024x768", help="image WIDTHxHEIGHT")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    cpu = describe_cpu()
    print("CPU:", json.dumps(cpu))
    dtype = resolve_dtype(args.dtype, "cpu")

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        SamModel(SamConfig()).save_pretrained(folder)
        SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)
        segmenter = TimedSegmenter(SamSegmenter(folder, dtype=dtype, max_batch_size=args.decoder_batch))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    cache = EmbeddingCache(max_bytes=2**30)
    start = time.perf_counter()
    embedding = segmenter.embed(image)
    encoder_s = time.perf_counter() - start
    cache.put(cache_key("bench-image", segmenter.model_id), embedding)
    print(f"encoder: {encoder_s:.2f} s")

    default = _run(
        segmenter,
        image,
        cache,
        EverythingParams(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch),
    )
    print("default thresholds:", default)
    worst = _run(
        segmenter,
        image,
        cache,
        EverythingParams(
            points_per_side=args.worst_points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
        ),
    )
    print("every candidate kept:", worst)
    post_ms_per_candidate = 1000 * worst["post_s"] / max(worst["candidates"], 1)
    full_candidates = 3 * args.points_per_side**2
    per_image_s = encoder_s + default["total_s"]
    result = {
        "cpu": cpu,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "model": "SamModel(SamConfig()) ViT-B, random weights",
        "image": [width, height],
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "decoder_batch": args.decoder_batch,
        "encoder_s": round(encoder_s, 3),
        "default": default,
        "worst": worst,
        "post_ms_per_kept_candidate": round(post_ms_per_candidate, 3),
        "worst_case_post_s_at_full_grid": round(post_ms_per_candidate * full_candidates / 1000, 2),
        "per_image_s": round(per_image_s, 2),
        "decoder_share_of_image": round(default["decoder_s"] / per_image_s, 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"per image: {per_image_s:.1f} s = encoder {encoder_s:.1f} s + {default['points']} points "
        f"(decoder {default['decoder_s']:.1f} s, post {default['post_s']:.2f} s); "
        f"worst-case post-processing at the full grid ~{result['worst_case_post_s_at_full_grid']} s"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
