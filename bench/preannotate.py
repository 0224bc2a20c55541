"""Pre-annotation time on CPU (issue 9): one 1024x768 image, 3 labels, 5 boxes, real-size models.

    .venv/bin/python -m bench.preannotate [--rounds 1] [--dtype auto] [--detector-max-size 0]

GroundingDINO-T and SAM ViT-B (random weights, :mod:`bench.common`) are loaded through
``registry.load_models``, the server's path, so every setting (DTYPE, TORCH_THREADS,
DETECTOR_MAX_SIZE, SEGMENTER_BATCH_SIZE) applies as in production. Random detectors find
arbitrary boxes, so the detector runs its real forward and post-processing and then reports
five fixed boxes (two cats, one dog, two persons): every variant segments the same objects.

Variants, run alternately in one process (ours, naive, ours, naive, ..., ours):

* ours: ``pipelines.preannotate`` on a cold embedding cache (the first sight of an image):
  one detector forward for all labels, one encoder forward, the boxes through the (folded)
  decoder as SEGMENTER_BATCH_SIZE says, masks encoded as Label Studio brush RLE.
* naive: what a backend without these choices does: float32, the detector, then for each box
  the image encoder again and one call of transformers' decoder, masks encoded with the SDK's
  ``mask2rle``.

Forward hooks time the raw detector, encoder and decoder forwards inside each run (ours: the
folded decoder, naive: transformers' ``SamModel.forward``), so the table compares each
pipeline with the model floor measured in the same run. Then 16 boxes ->
masks on one cached embedding, per decoder batch size and thread count, alternately; the
peak RSS is read after loading and after the first pre-annotation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache
from backend.models.base import Detection, Detector, PromptSet
from backend.models.registry import load_models
from backend.models.sam import SamSegmenter
from backend.pipelines.preannotate import PreannotateParams, preannotate
from backend.regions import encode_brush_rle
from bench.common import (
    LABEL_WORDS,
    ForwardTimer,
    Row,
    alternate,
    ensure_models,
    finish,
    load_average,
    machine,
    peak_rss_mb,
    print_machine,
    ratio,
    summary,
    synthetic_image,
    timed,
)

WIDTH, HEIGHT = 1024, 768
BOXES: tuple[tuple[tuple[float, float, float, float], int], ...] = (
    ((40, 60, 300, 400), 0),
    ((650, 50, 980, 350), 0),
    ((350, 80, 600, 380), 1),
    ((100, 450, 450, 740), 2),
    ((520, 420, 1000, 720), 2),
)
TARGETS = {"preannotate_s": 8.0, "speedup": 3.0, "boxes16_s": 0.5, "rss_gb": 4.0}


class FixedBoxes:
    """The real detector's forward and post-processing, then :data:`BOXES` as its answer."""

    def __init__(self, inner: Detector) -> None:
        self.inner = inner
        self.model_id = inner.model_id

    def detect(self, image: Image.Image, prompts: Sequence[str], box_threshold: float, text_threshold: float) -> list:
        self.inner.detect(image, prompts, box_threshold, text_threshold)
        return [Detection(box=box, score=0.9 - 0.05 * i, prompt_index=p) for i, (box, p) in enumerate(BOXES)]


@contextlib.contextmanager
def naive_models(detector: Any, segmenter: SamSegmenter) -> Iterator[None]:
    """The naive baseline's models: float32 whatever DTYPE resolved to, and SAM's decoder as
    transformers runs it (not folded). The adapters read both at every call."""
    saved = (detector.dtype, segmenter.dtype, segmenter.folded_decoder)
    detector.dtype = segmenter.dtype = torch.float32
    segmenter.folded_decoder = None
    try:
        yield
    finally:
        detector.dtype, segmenter.dtype, segmenter.folded_decoder = saved


def run_ours(image: Image.Image, sha: str, detector: FixedBoxes, segmenter: SamSegmenter) -> int:
    cache = EmbeddingCache(max_bytes=2**30)  # cold: this image has not been seen
    prompts = {label: [label] for label in LABEL_WORDS}
    instances = preannotate(image, sha, prompts, detector, segmenter, cache, PreannotateParams())
    for instance in instances:
        encode_brush_rle(instance.mask)
    return len(instances)


def run_naive(image: Image.Image, detector: FixedBoxes, segmenter: SamSegmenter) -> int:
    with naive_models(detector.inner, segmenter):
        detections = detector.detect(image, list(LABEL_WORDS), 0.3, 0.25)
        for detection in detections:
            embedding = segmenter.embed(image)
            mask = segmenter.segment(embedding, [PromptSet(box=detection.box)])[0].mask
            mask2rle(mask.astype(np.uint8) * 255)
    return len(detections)


def boxes_to_masks(segmenter: SamSegmenter, image: Image.Image, args: argparse.Namespace) -> dict[str, Any]:
    """16 boxes -> masks on one cached embedding, per decoder batch size and thread count."""
    embedding = segmenter.embed(image)
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(16):
        x0, y0 = rng.uniform(0, WIDTH - 320), rng.uniform(0, HEIGHT - 280)
        prompts.append(PromptSet(box=(x0, y0, x0 + rng.uniform(40, 320), y0 + rng.uniform(40, 280))))
    default_threads = torch.get_num_threads()

    def variant(batch: int, threads: int) -> Any:
        def run() -> None:
            torch.set_num_threads(threads)
            segmenter.max_batch_size = batch
            segmenter.segment(embedding, prompts)

        return run

    thread_counts = sorted({1, default_threads})
    variants = {f"batch {b}, {t} thread(s)": variant(b, t) for b in args.batch_sizes for t in thread_counts}
    samples = alternate(variants, args.box_rounds)
    torch.set_num_threads(default_threads)
    return {name: summary(values) for name, values in samples.items()}


def detector_sizes(detector: Any, image: Image.Image, sizes: Sequence[int], rounds: int) -> dict[str, Any]:
    """Detector time and boxes above threshold per DETECTOR_MAX_SIZE (random weights: the box
    counts show the input changed, not whether the boxes got worse)."""
    default_size = dict(detector.image_size)
    found: dict[int, int] = {}

    def variant(size: int) -> Any:
        def run() -> None:
            detector.image_size = {
                **default_size,
                "longest_edge": min(default_size["longest_edge"], size),
                "shortest_edge": min(default_size["shortest_edge"], size),
            }
            found[size] = detector.detect_with_stats(image, list(LABEL_WORDS), 0.3, 0.25)[1].above_box_threshold

        return run

    samples = alternate({size: variant(size) for size in sizes}, rounds)
    detector.image_size = default_size
    return {str(size): {**summary(samples[size]), "boxes_above_threshold": found[size]} for size in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="naive runs (ours runs one more); 0: ours once")
    parser.add_argument("--box-rounds", type=int, default=3, help="rounds of the 16-box comparison (0: skip)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--detector-max-size", type=int, default=0)
    parser.add_argument("--segmenter-batch-size", type=int, default=Settings().segmenter_batch_size)
    parser.add_argument("--detector-sizes", type=int, nargs="*", default=[], help="also time the detector alone here")
    args = parser.parse_args()

    info = machine()
    print_machine(info)
    paths = ensure_models()
    settings = Settings(
        detector_model=str(paths.detector),
        segmenter_model=str(paths.segmenter),
        device="cpu",
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        detector_max_size=args.detector_max_size,
        segmenter_batch_size=args.segmenter_batch_size,
    )
    load_s, bundle = timed(lambda: load_models(settings))
    rss_loaded = peak_rss_mb()
    print(f"models loaded in {load_s:.1f} s, peak RSS {rss_loaded:.0f} MiB", flush=True)
    detector, segmenter = FixedBoxes(bundle.detector), bundle.segmenter
    batch_size = segmenter.max_batch_size  # SEGMENTER_BATCH_SIZE as resolved for this device and dtype
    timer = ForwardTimer(
        {
            "detector": detector.inner.model,
            "encoder": segmenter.model.vision_encoder,
            "decoder": segmenter.decoder_module,  # ours: the folded decoder
            "raw_decoder": segmenter.model,  # the naive pipeline's: transformers' own forward
        }
    )
    image = synthetic_image(WIDTH, HEIGHT)
    sha = hashlib.sha256(image.tobytes()).hexdigest()

    pipelines = {
        "ours": lambda: run_ours(image, sha, detector, segmenter),
        "naive": lambda: run_naive(image, detector, segmenter),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pipelines}
    rss_after_first: float | None = None
    for index in range(2 * args.rounds + 1):
        name = "ours" if index % 2 == 0 else "naive"
        timer.reset()
        seconds, masks = timed(pipelines[name])
        forwards = timer.reset()
        record = {"total_s": round(seconds, 3), "masks": masks, **{f"{k}_s": v for k, v in forwards.items()}}
        record["backend_overhead_s"] = round(seconds - sum(forwards.values()), 3)
        runs[name].append(record)
        print(f"{name}: {record}  load {load_average()}", flush=True)
        if rss_after_first is None:
            rss_after_first = peak_rss_mb()

    boxes16 = boxes_to_masks(segmenter, image, args) if args.box_rounds else {}
    segmenter.max_batch_size = batch_size
    for name, stats in boxes16.items():
        print(f"16 boxes, {name}: {stats}", flush=True)
    sizes = detector_sizes(detector.inner, image, args.detector_sizes, 2) if args.detector_sizes else {}
    for size, stats in sizes.items():
        print(f"detector at DETECTOR_MAX_SIZE={size}: {stats}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    ours_s = median("ours", "total_s")
    floor_s = median("ours", "detector_s") + median("ours", "encoder_s") + median("ours", "decoder_s")
    rss_gb = max(rss_loaded, rss_after_first or 0.0) / 1024
    rows = [
        Row("pre-annotation, 1024x768, 3 labels, 5 boxes (ours)", f"<= {TARGETS['preannotate_s']:.0f} s",
            f"{ours_s:.1f} s", ours_s <= TARGETS["preannotate_s"]),
        Row("raw detector + encoder + decoder forwards inside ours", "",
            f"{floor_s:.1f} s (ours = {ratio(ours_s, floor_s)}x the model floor)"),
    ]
    if runs["naive"]:
        naive_s = median("naive", "total_s")
        rows += [
            Row("naive pipeline (fp32, encoder per box, SDK RLE)", "", f"{naive_s:.1f} s"),
            Row("speed-up over naive, same run", f">= {TARGETS['speedup']:.0f}x", f"{ratio(naive_s, ours_s)}x",
                naive_s / ours_s >= TARGETS["speedup"]),
        ]
    if boxes16:
        default_batch = f"batch {batch_size}, {torch.get_num_threads()} thread(s)"
        boxes16_s = boxes16.get(default_batch, min(boxes16.values(), key=lambda s: s["median_s"]))["median_s"]
        best16 = min(boxes16, key=lambda k: boxes16[k]["median_s"])
        worst16 = max(boxes16, key=lambda k: boxes16[k]["median_s"])
        rows += [
            Row(f"16 boxes -> masks, cached embedding ({default_batch})", f"<= {TARGETS['boxes16_s']} s",
                f"{boxes16_s:.2f} s", boxes16_s <= TARGETS["boxes16_s"]),
            Row("16 boxes -> masks, fastest / slowest variant", "",
                f"{boxes16[best16]['median_s']:.2f} s ({best16}) / {boxes16[worst16]['median_s']:.2f} s ({worst16})"),
        ]
    rows += [
        Row(f"detector alone, DETECTOR_MAX_SIZE={size}", "",
            f"{stats['median_s']:.1f} s ({stats['boxes_above_threshold']} boxes above threshold)")
        for size, stats in sizes.items()
    ]
    rows.append(Row("peak RSS, both models loaded + one pre-annotation", f"<= {TARGETS['rss_gb']:.0f} GB",
                    f"{rss_gb:.2f} GiB", rss_gb <= TARGETS["rss_gb"]))
    results = {
        "settings": vars(args),
        "dtype": str(segmenter.dtype).removeprefix("torch."),
        "segmenter_batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "detector_input": dict(detector.inner.image_size),
        "load_s": round(load_s, 2),
        "runs": runs,
        "boxes16": boxes16,
        "detector_sizes": sizes,
        "peak_rss_mib": {"after_load": round(rss_loaded), "after_first_preannotation": round(rss_after_first or 0)},
    }
    finish("preannotate", info, rows, results)


if __name__ == "__main__":
    main()
