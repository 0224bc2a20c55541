"""The model routes side by side on CPU, with real-size random weights.

    .venv/bin/python -m bench.zoo                          # every route, one after the other
    .venv/bin/python -m bench.zoo --routes sam3 sam3-naive # some of them (merged into zoo.json)

Routes, each in its own subprocess so that its peak RSS is its own (a server holds one route):

* ``grounded``: GroundingDINO-T + SAM ViT-B through ``load_models`` (the production path):
  SAM's image encoder, then ``preannotate`` with 3 labels on the cached embedding (detector,
  batched box decoder, post-processing); then warm clicks (decoder only).
* ``sam3``: ``PIPELINE=sam3`` through ``load_models``: SAM 3's ViT once, then
  ``preannotate_concepts`` with the 3 labels (neck + one prompt pass per label on the cached
  ViT output); then the first click (the tracker's neck on the same cached ViT output, no ViT)
  and warm clicks.
* ``sam3-naive``: what SAM 3's model card does, per label: ``processor(images, text)``,
  a whole ``Sam3Model`` forward, ``post_process_instance_segmentation`` (default threshold).
* ``sam2``: SAM 2.1 hiera-tiny as a click segmenter: image encoder, warm clicks.

Random weights decide nothing about speed, but they decide how many instances survive the
thresholds (and so the mask post-processing cost): the two production routes run at threshold 0
with ``MAX_DETECTIONS=20``, so both post-process 20 instances. Random SAM 3 scores ~0.25, below
the card's 0.3 threshold, so the naive route keeps none: its time is a lower bound.

One round per route (a whole SAM 3 forward takes minutes on two cores): timings come with the
process's CPU seconds, which contention inflates far less than wall time, and with the load
average before and after. Models are built once (a subprocess) into ``bench.common.MODELS_DIR``:
SAM 3 in the hub layout of facebook/sam3 (~3.4 GB), SAM 2.1 hiera-tiny (~125 MB). Writes
bench/results/zoo.json and zoo.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench.common import (
    LABEL_WORDS,
    MODELS_DIR,
    RESULTS_DIR,
    Row,
    ensure_models,
    finish,
    load_average,
    machine,
    peak_rss_mb,
    print_machine,
    ratio,
    synthetic_image,
)

ROUTES = ("grounded", "sam3", "sam3-naive", "sam2")
SAM3_FOLDER = "sam3-random"
SAM2_FOLDER = "sam2.1-hiera-tiny-random"
IMAGE_SIZE = (1024, 768)
MAX_DETECTIONS = 20
CLICKS = ((300.0, 200.0), (520.0, 410.0), (800.0, 600.0), (150.0, 650.0), (640.0, 120.0))

T = TypeVar("T")


def _measured(fn: Callable[[], T]) -> tuple[dict[str, float], T]:
    """Wall and process-CPU seconds of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}, result


def _clicks(segmenter: Any, embedding: Any) -> dict[str, float]:
    """Median wall and CPU ms of single positive clicks on a cached embedding (decoder +
    upsampling to the image size)."""
    from backend.models.base import PromptSet

    timings = [
        _measured(lambda p=point: segmenter.segment(embedding, [PromptSet(points=[p], point_labels=[1])]))[0]
        for point in CLICKS
    ]
    wall = [t["wall_s"] * 1000 for t in timings]
    return {
        "median_ms": round(statistics.median(wall), 1),
        "min_ms": round(min(wall), 1),
        "median_cpu_ms": round(statistics.median(t["cpu_s"] * 1000 for t in timings), 1),
        "n": len(timings),
    }


def _params() -> Any:
    from backend.pipelines.preannotate import PreannotateParams

    return PreannotateParams(box_threshold=0.0, text_threshold=0.0, max_detections=MAX_DETECTIONS)


def _labels() -> dict[str, tuple[str, ...]]:
    return {word: (word,) for word in LABEL_WORDS}


def _load(settings: Any) -> tuple[dict[str, float], Any, Any]:
    """``load_models`` timed (the server's path), its bundle, and the embedding cache the
    bundle shares (SAM 3's tracker reads the concept model's ViT output from it)."""
    from backend.embedding_cache import EmbeddingCache
    from backend.models.registry import load_models

    cache = EmbeddingCache(2**31)
    load, bundle = _measured(lambda: load_models(settings, cache))
    return load, bundle, cache


def _embed(model: Any, image: Any, sha: str, cache: Any) -> tuple[dict[str, float], Any]:
    """``model.embed(image)`` timed, through the cache entry the pipelines then read."""
    from backend.embedding_cache import cache_key

    return _measured(lambda: cache.get_or_compute(cache_key(sha, model.model_id), lambda: model.embed(image)))


def _per_image(*parts: dict[str, float]) -> dict[str, float]:
    """The wall and CPU seconds of all the steps one image takes, for the routes' comparison."""
    return {
        "per_image_wall_s": round(sum(part["wall_s"] for part in parts), 2),
        "per_image_cpu_s": round(sum(part["cpu_s"] for part in parts), 2),
    }


# -- workers (one route per process) --------------------------------------------------------


def _grounded(image: Any, sha: str) -> dict[str, Any]:
    from backend.config import Settings
    from backend.pipelines.preannotate import preannotate

    paths = ensure_models()
    load, bundle, cache = _load(
        Settings(detector_model=str(paths.detector), segmenter_model=str(paths.segmenter), device="cpu")
    )
    segmenter, detector = bundle.segmenter, bundle.detector
    encoder, embedding = _embed(segmenter, image, sha, cache)
    rest, found = _measured(lambda: preannotate(image, sha, _labels(), detector, segmenter, cache, _params()))
    return {
        "models": {"detector": "GroundingDINO-T (172M)", "segmenter": "SAM ViT-B (94M)"},
        "load": load,
        "image_encoder": encoder,
        "labels_on_cached_image": rest,
        **_per_image(encoder, rest),
        "instances": len(found),
        "warm_click": _clicks(segmenter, embedding),
    }


def _sam3(image: Any, sha: str) -> dict[str, Any]:
    from backend.config import Settings
    from backend.pipelines.preannotate import preannotate_concepts

    load, bundle, cache = _load(Settings(segmenter_model=str(MODELS_DIR / SAM3_FOLDER), device="cpu"))
    concept, tracker = bundle.concept_segmenter, bundle.segmenter
    backbone, _ = _embed(concept, image, sha, cache)
    prompts, found = _measured(lambda: preannotate_concepts(image, sha, _labels(), concept, cache, _params()))
    first_click_embed, embedding = _embed(tracker, image, sha, cache)
    return {
        "models": {"concept_segmenter": "Sam3Model (840M)", "segmenter": "Sam3TrackerModel on the shared ViT (+12M)"},
        "load": load,
        "backbone_once": backbone,
        "three_prompt_passes": prompts,
        **_per_image(backbone, prompts),
        "instances": len(found),
        "tracker_features_from_cached_vit": first_click_embed,
        "warm_click": _clicks(tracker, embedding),
        "vit_shared": tracker.model.vision_encoder.backbone is concept.model.vision_encoder.backbone,
    }


def _sam3_naive(image: Any, sha: str) -> dict[str, Any]:
    import torch
    from transformers import Sam3Model, Sam3Processor

    folder = MODELS_DIR / SAM3_FOLDER
    load, (model, processor) = _measured(
        lambda: (Sam3Model.from_pretrained(folder).eval(), Sam3Processor.from_pretrained(folder))
    )

    def one_label(label: str) -> list[dict[str, Any]]:
        inputs = processor(images=image, text=label, return_tensors="pt")
        with torch.inference_mode():
            output = model(**inputs)
        return processor.post_process_instance_segmentation(output, target_sizes=[image.size[::-1]])

    per_label = {label: _measured(lambda lab=label: one_label(lab))[0] for label in LABEL_WORDS}
    return {
        "models": {"concept_segmenter": "Sam3Model (840M), whole forward per label"},
        "load": load,
        "per_label": per_label,
        **_per_image(*per_label.values()),
    }


def _sam2(image: Any, sha: str) -> dict[str, Any]:
    from backend.models.sam import SamSegmenter

    load, segmenter = _measured(lambda: SamSegmenter(str(MODELS_DIR / SAM2_FOLDER), device="cpu"))
    encoder, embedding = _measured(lambda: segmenter.embed(image))
    return {
        "models": {"segmenter": "Sam2Model hiera-tiny (31M)"},
        "load": load,
        "image_encoder": encoder,
        "warm_click": _clicks(segmenter, embedding),
    }


_WORKERS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "grounded": _grounded,
    "sam3": _sam3,
    "sam3-naive": _sam3_naive,
    "sam2": _sam2,
}


def _work(route: str) -> None:
    """Run one route in this process and print its result as the last stdout line."""
    from backend.images import pixel_sha256
    from backend.models.loading import resolve_dtype

    image = synthetic_image(*IMAGE_SIZE)
    start_load = load_average()
    result = _WORKERS[route](image, pixel_sha256(image))
    result.update(
        dtype=str(resolve_dtype("auto", "cpu")).removeprefix("torch."),
        peak_rss_mb=round(peak_rss_mb()),
        load_average=[start_load, load_average()],
    )
    print(json.dumps(result), flush=True)


# -- building the models --------------------------------------------------------------------


def _build() -> None:
    """Save real-size random SAM 3 (hub layout) and SAM 2.1 hiera-tiny under MODELS_DIR."""
    import torch
    from transformers import (
        Sam2Config,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
        Sam3Config,
        Sam3ImageProcessor,
        Sam3Model,
        Sam3Processor,
        Sam3TrackerConfig,
        Sam3TrackerModel,
        Sam3TrackerVideoConfig,
    )

    from tests.tiny_models import clip_tokenizer
    from tests.tiny_sam3_models import save_sam3_hub_checkpoint

    torch.manual_seed(0)
    sam2 = MODELS_DIR / SAM2_FOLDER
    Sam2Model(Sam2Config()).save_pretrained(sam2)  # the default config is hiera-tiny
    Sam2Processor(image_processor=Sam2ImageProcessor()).save_pretrained(sam2)

    # the real sizes (ViT-L/14 at 1008 px, CLIP text encoder); a test tokenizer: text-encoder
    # cost depends on the padded length (always 32), not the vocabulary
    save_sam3_hub_checkpoint(
        MODELS_DIR / SAM3_FOLDER,
        Sam3Model(Sam3Config()),
        Sam3TrackerModel(Sam3TrackerConfig()),
        Sam3TrackerVideoConfig(),
        Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=clip_tokenizer(LABEL_WORDS, 32)),
    )


def _ensure_zoo_models() -> None:
    if not all((MODELS_DIR / f / "config.json").exists() for f in (SAM3_FOLDER, SAM2_FOLDER)):
        print(f"building real-size random SAM 3 and SAM 2.1 hiera-tiny into {MODELS_DIR} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "bench.zoo", "--build"], check=True)
    ensure_models()


# -- orchestration --------------------------------------------------------------------------


def _rows(routes: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    grounded, sam3, naive, sam2 = (routes.get(r) for r in ROUTES)
    for name, result in routes.items():
        rows.append(
            Row(
                f"{name}: per image, 3 labels" if "per_image_wall_s" in result else f"{name}: image encoder",
                "",
                (
                    f"{result['per_image_wall_s']} s wall, {result['per_image_cpu_s']} CPU s"
                    if "per_image_wall_s" in result
                    else f"{result['image_encoder']['wall_s']} s wall, {result['image_encoder']['cpu_s']} CPU s"
                )
                + f"; peak RSS {result['peak_rss_mb']} MiB",
            )
        )
        if "warm_click" in result:
            click = result["warm_click"]
            rows.append(
                Row(f"{name}: warm click", "", f"{click['median_ms']} ms wall, {click.get('median_cpu_ms')} CPU ms")
            )
    if sam3 and naive:
        rows.append(
            Row(
                "SAM 3 backbone once + 3 prompt passes vs whole forward per label (CPU s)",
                "< 1",
                str(ratio(sam3["per_image_cpu_s"], naive["per_image_cpu_s"])),
                sam3["per_image_cpu_s"] < naive["per_image_cpu_s"],
            )
        )
    if sam3:
        rows.append(
            Row(
                "first click after SAM 3 pre-annotation (tracker neck on the cached ViT)",
                "no ViT run: << backbone",
                f"{sam3['tracker_features_from_cached_vit']['wall_s']} s "
                f"vs backbone {sam3['backbone_once']['wall_s']} s",
                sam3["tracker_features_from_cached_vit"]["cpu_s"] < 0.2 * sam3["backbone_once"]["cpu_s"],
            )
        )
    if grounded and sam2:
        rows.append(
            Row(
                "SAM 2.1 hiera-tiny encoder / SAM ViT-B encoder (CPU s)",
                "~0.3",
                str(ratio(sam2["image_encoder"]["cpu_s"], grounded["image_encoder"]["cpu_s"])),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--worker", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        _build()
        return
    if args.worker:
        _work(args.worker)
        return

    info = machine()
    print_machine(info)
    _ensure_zoo_models()
    path = RESULTS_DIR / "zoo.json"
    routes: dict[str, dict[str, Any]] = json.loads(path.read_text())["routes"] if path.exists() else {}
    for route in args.routes:
        print(f"{route} ...", flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "bench.zoo", "--worker", route], check=True, capture_output=True, text=True
        )
        routes[route] = {**json.loads(done.stdout.strip().splitlines()[-1]), "machine": info}
        print(json.dumps(routes[route], indent=2), flush=True)
    ordered = {route: routes[route] for route in ROUTES if route in routes}
    finish("zoo", info, _rows(ordered), {"routes": ordered})


if __name__ == "__main__":
    main()
