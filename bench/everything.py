"""Everything-mode time per image on CPU with a real-size SAM ViT-B (random weights).

    .venv/bin/python -m bench.everything [--points-per-side 32] [--size 1024x768] [--rounds 2]
    .venv/bin/python -m bench.everything --variants auto:0 auto:0:1 float32:0   # compared, ABAB...
    .venv/bin/python -m bench.everything --variants auto:0 auto:1:0:raw     # folded vs transformers decoder

The segmenter is the saved random SAM ViT-B of :func:`bench.common.ensure_models` (weights
re-initialised so masks are not empty), loaded through ``registry.load_segmenter`` -- the
production path -- and every round runs ``generate_masks`` on a fresh embedding cache, i.e.
what one new image costs in ``PREDICTION_MODE=everything``: one encoder forward, then the
``points_per_side``^2 grid in ``points_per_batch`` batches of ``segment_candidates``, then the
filters (predicted IoU, stability), upsampling of the kept candidates, COCO RLE, box NMS.

Per image it reports the wall time and its split:

* ``encoder``: ``segmenter.embed`` (preprocessing + ViT forward);
* ``decoder``: all ``segment_candidates`` calls (prompt tensors + decoder forwards + copies);
* ``post``: the rest of ``generate_masks`` (filters, upsampling, RLE, NMS);

next to the raw model forwards measured by forward hooks in the same run (the ViT, and
``SamModel.forward`` with cached embeddings, i.e. prompt encoder + mask decoder): their sum is
the floor, and total / floor is what the pipeline adds.

Variants ``DTYPE[:BATCH[:THREADS]]`` (as ``DTYPE=``, ``SEGMENTER_BATCH_SIZE=`` -- 0: by
device and dtype, on CPU one prompt per decoder call in float32 and two with bfloat16 -- and
``TORCH_THREADS=`` -- 0: torch's default) switch the one loaded segmenter's compute dtype,
batch size and torch's thread count; they run alternately (A B, B A, A B...) for ``--rounds``
rounds.

Random weights decide nothing about speed, but they decide how many candidates pass the
filters, which sets the post-processing cost; so a second run keeps every candidate (both
thresholds 0) on a small grid (``--worst-points-per-side``) on the cached embedding: its
post-processing time per candidate, times 3 x the full grid's points, bounds the
post-processing of an image where everything passes.

Prints the CPU and the load average; writes bench/results/everything.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache, cache_key
from backend.images import pixel_sha256
from backend.models.base import ImageEmbedding, MaskCandidates, PromptSet
from backend.models.loading import resolve_dtype
from backend.models.registry import load_segmenter
from backend.models.sam import SamSegmenter, resolve_batch_size
from backend.pipelines.everything import EverythingParams, generate_masks
from bench.common import (
    ForwardTimer,
    Row,
    ensure_models,
    finish,
    load_average,
    machine,
    print_machine,
    ratio,
    synthetic_image,
)

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice: one per core


class TimedSegmenter:
    """Forwards to a segmenter and adds up the wall time of its encoder and decoder calls."""

    def __init__(self, inner: SamSegmenter) -> None:
        self.inner = inner
        self.folded = inner.folded_decoder  # put back by the variants that use it
        self.model_id = inner.model_id
        self.encoder_s = self.decoder_s = 0.0
        self.calls = self.candidates = 0

    def reset(self) -> None:
        self.encoder_s = self.decoder_s = 0.0
        self.calls = self.candidates = 0

    def embed(self, image: Image.Image) -> ImageEmbedding:
        start = time.perf_counter()
        embedding = self.inner.embed(image)
        self.encoder_s += time.perf_counter() - start
        return embedding

    def segment(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet], multimask: bool = False) -> list:
        return self.inner.segment(embedding, prompts, multimask)

    def segment_candidates(self, embedding: ImageEmbedding, prompts: Sequence[PromptSet]) -> list[MaskCandidates]:
        start = time.perf_counter()
        found = self.inner.segment_candidates(embedding, prompts)
        self.decoder_s += time.perf_counter() - start
        self.calls += 1
        self.candidates += sum(len(c.scores) for c in found)
        return found


def _variant(spec: str) -> tuple[str, int, int, str]:
    """``DTYPE[:BATCH[:THREADS[:DECODER]]]`` -> (dtype, batch, threads, decoder); 0 means the
    default, DECODER is ``folded`` (default: what the backend runs) or ``raw`` (transformers')."""
    dtype, batch, threads, decoder = [*spec.split(":"), "", "", ""][:4]
    if decoder not in ("", "folded", "raw"):
        raise SystemExit(f"decoder must be folded or raw, got {decoder!r} in {spec!r}")
    return dtype or "auto", int(batch or 0), int(threads or 0), decoder or "folded"


def _configure(segmenter: TimedSegmenter, dtype: str, batch: int, threads: int, decoder: str) -> None:
    """Point the loaded adapter at a variant (weights stay float32; the dtype is autocast)."""
    inner = segmenter.inner
    inner.dtype = resolve_dtype(dtype, "cpu")
    inner.folded_decoder = segmenter.folded if decoder == "folded" else None
    inner.max_batch_size = resolve_batch_size(batch, "cpu", inner.dtype, folded=inner.folded_decoder is not None)
    torch.set_num_threads(threads or DEFAULT_THREADS)


def _image_run(
    segmenter: TimedSegmenter,
    timer: ForwardTimer,
    image: Image.Image,
    sha: str,
    params: EverythingParams,
    cache: EmbeddingCache | None = None,
) -> dict[str, Any]:
    """One ``generate_masks``; a fresh cache (the default) makes it include the encoder."""
    segmenter.reset()
    timer.reset()
    cache = cache or EmbeddingCache(max_bytes=2**30)
    wall, cpu = time.perf_counter(), time.process_time()
    masks = generate_masks(image, sha, segmenter, cache, params)
    total, cpu = time.perf_counter() - wall, time.process_time() - cpu
    raw = timer.reset()
    post = total - segmenter.encoder_s - segmenter.decoder_s
    return {
        "total_s": round(total, 3),
        "cpu_s": round(cpu, 2),
        "encoder_s": round(segmenter.encoder_s, 3),
        "decoder_s": round(segmenter.decoder_s, 3),
        "post_s": round(post, 3),
        "raw_encoder_s": raw["encoder"],
        "raw_decoder_s": round(raw["decoder"] + raw["model_decoder"], 4),
        "points": params.points_per_side**2,
        "segment_candidates_calls": segmenter.calls,
        "candidates": segmenter.candidates,
        "masks": len(masks),
        "load_average": load_average()[0],
    }


def _median(runs: Sequence[dict[str, Any]], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def _summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = ("total_s", "cpu_s", "encoder_s", "decoder_s", "post_s", "raw_encoder_s", "raw_decoder_s")
    medians = {key: _median(runs, key) for key in keys}
    floors = [run["raw_encoder_s"] + run["raw_decoder_s"] for run in runs]
    ratios = [run["total_s"] / floor for run, floor in zip(runs, floors, strict=True)]
    points = runs[0]["points"]
    return {
        **medians,
        "raw_forwards_s": round(statistics.median(floors), 3),
        "total_over_raw_forwards": round(statistics.median(ratios), 3),
        "decoder_ms_per_point": round(1000 * medians["decoder_s"] / points, 1),
        "raw_decoder_ms_per_point": round(1000 * medians["raw_decoder_s"] / points, 1),
        "masks": runs[0]["masks"],
        "candidates": runs[0]["candidates"],
        "n": len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--worst-points-per-side", type=int, default=8)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--decoder-batch", type=int, default=0, help="SEGMENTER_BATCH_SIZE (0: by device and dtype)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="DTYPE[:BATCH[:THREADS]] run alternately (default: --dtype:--decoder-batch)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="1024x768", help="image WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    variants = args.variants or [f"{args.dtype}:{args.decoder_batch}"]

    info = machine()
    print_machine(info)
    paths = ensure_models()
    segmenter = TimedSegmenter(
        load_segmenter(Settings(segmenter_model=str(paths.segmenter), device="cpu", dtype=args.dtype))
    )
    timer = ForwardTimer(
        {
            "encoder": segmenter.inner.model.vision_encoder,
            "decoder": segmenter.inner.decoder_module,  # the folded decoder
            "model_decoder": segmenter.inner.model,  # transformers' forward (the raw variants)
        }
    )
    image = synthetic_image(width, height)
    sha = pixel_sha256(image)
    params = EverythingParams(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch)

    runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in variants}
    for round_index in range(args.rounds):
        for spec in variants if round_index % 2 == 0 else list(reversed(variants)):
            _configure(segmenter, *_variant(spec))
            run = _image_run(segmenter, timer, image, sha, params)
            runs[spec].append(run)
            print(f"round {round_index + 1} {spec}: {run}", flush=True)
    results = {spec: _summarise(spec_runs) for spec, spec_runs in runs.items()}

    # the post-processing bound: every candidate kept, on the cached embedding of variant 1
    _configure(segmenter, *_variant(variants[0]))
    cache = EmbeddingCache(max_bytes=2**30)
    cache.put(cache_key(sha, segmenter.model_id), segmenter.inner.embed(image))
    worst = _image_run(
        segmenter,
        timer,
        image,
        sha,
        EverythingParams(
            points_per_side=args.worst_points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
        ),
        cache,
    )
    print(f"every candidate kept ({args.worst_points_per_side}^2 points): {worst}", flush=True)
    post_ms_per_candidate = 1000 * worst["post_s"] / max(worst["candidates"], 1)
    worst_post_s = round(post_ms_per_candidate * 3 * args.points_per_side**2 / 1000, 2)

    rows: list[Row] = []
    for spec, result in results.items():
        dtype, batch, threads, decoder = _variant(spec)
        name = (
            f"{args.points_per_side}x{args.points_per_side} grid, {width}x{height}, DTYPE={dtype} "
            f"(= {str(resolve_dtype(dtype, 'cpu')).removeprefix('torch.')}), SEGMENTER_BATCH_SIZE={batch}, "
            f"TORCH_THREADS={threads}, {decoder} decoder"
        )
        rows += [
            Row(
                f"{name}: per image",
                "",
                f"{result['total_s']} s wall ({result['cpu_s']} CPU s) = encoder {result['encoder_s']} s "
                f"+ decoder {result['decoder_s']} s + filters/upsampling/RLE/NMS {result['post_s']} s",
            ),
            Row(
                f"{name}: raw forwards (ViT {result['raw_encoder_s']} s + decoder {result['raw_decoder_s']} s)",
                "",
                f"{result['raw_forwards_s']} s; per image / raw = {result['total_over_raw_forwards']}x; "
                f"decoder {result['decoder_ms_per_point']} ms/point (raw {result['raw_decoder_ms_per_point']})",
            ),
        ]
    if len(results) > 1:
        first = results[variants[0]]
        for spec in variants[1:]:
            rows.append(
                Row(f"per image, {spec} / {variants[0]}", "", str(ratio(results[spec]["total_s"], first["total_s"])))
            )
    rows.append(
        Row(
            f"post-processing if every candidate passed (bound from {args.worst_points_per_side}^2 points, all kept)",
            "",
            f"{post_ms_per_candidate:.2f} ms/candidate -> ~{worst_post_s} s at {3 * args.points_per_side**2}",
        )
    )
    finish(
        "everything",
        info,
        rows,
        {
            "model": "SAM ViT-B (SamModel(SamConfig())), random weights std 0.02",
            "image": [width, height],
            "points_per_side": args.points_per_side,
            "points_per_batch": args.points_per_batch,
            "rounds": args.rounds,
            "variants": results,
            "runs": runs,
            "worst": worst,
            "post_ms_per_kept_candidate": round(post_ms_per_candidate, 3),
            "worst_case_post_s_at_full_grid": worst_post_s,
        },
    )


if __name__ == "__main__":
    main()
