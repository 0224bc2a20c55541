"""The model routes side by side on CPU, with real-size random weights, alternating round by round.

    .venv/bin/python -m bench.zoo                                  # the default routes, 3 rounds
    .venv/bin/python -m bench.zoo --routes owlv2 sam-hq --rounds 2 # some of them (merged into zoo.json)
    .venv/bin/python -m bench.zoo --routes sam3 sam3-naive --rounds 1

Every route is loaded the way a server loads it, ``registry.load_models(Settings(...))``, and
timed through the backend's own adapters; forward hooks time the raw model forwards inside them.
Each (round, route) runs in a fresh subprocess, so a route's peak RSS is its own (a server holds
one route), and the routes alternate round by round: A B C, C B A, A B C... (other jobs on the
machine then inflate every route alike). Each process pays its first-forward warm-up, the same
for every route; the tables give medians over the rounds.

Text routes (detector boxes -> segmenter masks), per image: the segmenter's image encoder
(``embed``), then ``preannotate`` with 3 labels on the cached embedding, split into the
detector's ``detect`` call (preprocessing, forward, box post-processing), the box decoder (one
``segment`` call for the boxes; per box = its time / the box count) and the rest; then warm
clicks (decoder + upsampling):

* ``grounded``: GroundingDINO-T + SAM ViT-B (the default route);
* ``mm-grounded``: MM-GroundingDINO (``MMGroundingDinoConfig()``: Swin-T + bert-base, the
  ``mm_grounding_dino_tiny_*`` size) + SAM ViT-B;
* ``owlv2``: OWLv2 base/16 at 960 px (the ``google/owlv2-base-patch16(-ensemble)`` size) + SAM ViT-B;
* ``sam-hq``: GroundingDINO-T + SAM-HQ ViT-B (``SamHQConfig()``, the ``syscv-community/sam-hq-vit-base`` size).

Click segmenters alone: ``sam2`` (SAM 2.1 hiera-tiny): image encoder, 5 single boxes, warm clicks.

SAM 3 (``--routes sam3 sam3-naive``; not in the default set: one SAM 3 forward takes minutes on
two cores and its folder is ~3.4 GB):

* ``sam3``: ``PIPELINE=sam3`` through ``load_models``: SAM 3's ViT once, then
  ``preannotate_concepts`` with the 3 labels (neck + one prompt pass per label on the cached
  ViT output); then the first click (the tracker's neck on the same cached ViT output, no ViT)
  and warm clicks.
* ``sam3-naive``: what SAM 3's model card does, per label: ``processor(images, text)``,
  a whole ``Sam3Model`` forward, ``post_process_instance_segmentation`` (default threshold).

Random weights decide nothing about speed, but they decide how many instances survive the
thresholds (and so the mask post-processing cost): the production routes run at threshold 0
with ``MAX_DETECTIONS=20``, so each decodes and post-processes 20 instances. Random SAM 3
scores ~0.25, below the card's 0.3 threshold, so the naive route keeps none: its time is a
lower bound.

Timings come with the process's CPU seconds (contention inflates them less than wall time)
and the load average before and after each route. Models are built once (a subprocess, only
those the chosen routes need) into ``bench.common.MODELS_DIR`` (``BENCH_MODELS_DIR``): SAM 3 in
the hub layout of facebook/sam3 (~3.4 GB), SAM 2.1 hiera-tiny (~125 MB), OWLv2 base (~0.6 GB),
MM-GroundingDINO tiny (~0.7 GB), SAM-HQ ViT-B (~0.4 GB). Writes bench/results/zoo.json and zoo.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    LABEL_WORDS,
    MODELS_DIR,
    RESULTS_DIR,
    ForwardTimer,
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

ROUTES = ("grounded", "mm-grounded", "owlv2", "sam-hq", "sam2", "sam3", "sam3-naive")
DEFAULT_ROUTES = ("grounded", "mm-grounded", "owlv2", "sam-hq", "sam2")
SAM3_FOLDER = "sam3-random"
SAM2_FOLDER = "sam2.1-hiera-tiny-random"
MM_GDINO_FOLDER = "mm-grounding-dino-tiny-random"
OWLV2_FOLDER = "owlv2-base-patch16-random"
SAM_HQ_FOLDER = "sam-hq-vit-base-random"
# the folders each route needs beyond bench.common's SAM ViT-B and GroundingDINO-T
ROUTE_FOLDERS: dict[str, tuple[str, ...]] = {
    "mm-grounded": (MM_GDINO_FOLDER,),
    "owlv2": (OWLV2_FOLDER,),
    "sam-hq": (SAM_HQ_FOLDER,),
    "sam2": (SAM2_FOLDER,),
    "sam3": (SAM3_FOLDER,),
    "sam3-naive": (SAM3_FOLDER,),
}
IMAGE_SIZE = (1024, 768)
MAX_DETECTIONS = 20
CLICKS = ((300.0, 200.0), (520.0, 410.0), (800.0, 600.0), (150.0, 650.0), (640.0, 120.0))
BOXES = (
    (100.0, 80.0, 420.0, 360.0),
    (600.0, 300.0, 900.0, 700.0),
    (40.0, 420.0, 300.0, 740.0),
    (450.0, 60.0, 760.0, 280.0),
    (300.0, 250.0, 700.0, 600.0),
)

T = TypeVar("T")


def _measured(fn: Callable[[], T]) -> tuple[dict[str, float], T]:
    """Wall and process-CPU seconds of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}, result


class Stopwatch:
    """Wall and CPU seconds spent inside one method of an adapter instance (the method is
    wrapped on the instance, so the pipeline calling it is timed from the inside)."""

    def __init__(self, owner: Any, method: str, items: Callable[[tuple], int] | None = None) -> None:
        self.wall_s = self.cpu_s = 0.0
        self.calls = self.items = 0
        inner = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall_s += time.perf_counter() - wall
                self.cpu_s += time.process_time() - cpu
                self.calls += 1
                self.items += items(args) if items else 0

        setattr(owner, method, timed)

    def totals(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3), "calls": self.calls}


def _parameters(model: Any) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


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


def _boxes(segmenter: Any, embedding: Any) -> dict[str, float]:
    """Median wall and CPU ms of single boxes on a cached embedding, one ``segment`` call each."""
    from backend.models.base import PromptSet

    timings = [_measured(lambda b=box: segmenter.segment(embedding, [PromptSet(box=b)]))[0] for box in BOXES]
    return {
        "median_ms": round(statistics.median(t["wall_s"] * 1000 for t in timings), 1),
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


def _text_route(detector_folder: Path, segmenter_folder: Path, names: dict[str, str], image: Any, sha: str) -> dict:
    """A detector + segmenter route through ``load_models`` and ``preannotate`` (see the module
    docstring), each adapter call timed from the inside, the raw forwards by hooks."""
    from backend.config import Settings
    from backend.pipelines.preannotate import preannotate

    load, bundle, cache = _load(
        Settings(detector_model=str(detector_folder), segmenter_model=str(segmenter_folder), device="cpu")
    )
    segmenter, detector = bundle.segmenter, bundle.detector
    timer = ForwardTimer(
        {"detector": detector.model, "encoder": segmenter.model.vision_encoder, "decoder": segmenter.decoder_module}
    )
    encoder, embedding = _embed(segmenter, image, sha, cache)
    raw_encoder = timer.reset()["encoder"]
    detect = Stopwatch(detector, "detect_with_stats")
    decode = Stopwatch(segmenter, "segment", items=lambda args: len(args[1]))  # segment(embedding, prompts)
    rest, found = _measured(lambda: preannotate(image, sha, _labels(), detector, segmenter, cache, _params()))
    raw = timer.reset()
    detect_s, decode_s = detect.totals(), decode.totals()
    boxes = max(decode.items, 1)  # after NMS and cross-label deduplication, at most MAX_DETECTIONS
    return {
        "models": {
            "detector": f"{names['detector']} ({_parameters(detector.model)})",
            "segmenter": f"{names['segmenter']} ({_parameters(segmenter.model)})",
        },
        "load": load,
        "image_encoder": encoder,
        "labels_on_cached_image": rest,
        **_per_image(encoder, rest),
        "detector": detect_s,
        "box_decoder": {**decode_s, "boxes": boxes},
        "per_box_ms": round(1000 * decode_s["wall_s"] / boxes, 1),
        "per_box_cpu_ms": round(1000 * decode_s["cpu_s"] / boxes, 1),
        "post_processing_s": round(rest["wall_s"] - detect_s["wall_s"] - decode_s["wall_s"], 3),
        "raw_forwards": {
            "encoder_s": raw_encoder,
            "detector_s": raw["detector"],
            "decoder_s": raw["decoder"],
            "decoder_ms_per_box": round(1000 * raw["decoder"] / boxes, 1),
        },
        "instances": len(found),
        "warm_click": _clicks(segmenter, embedding),
    }


def _grounded(image: Any, sha: str) -> dict[str, Any]:
    paths = ensure_models()
    names = {"detector": "GroundingDINO-T", "segmenter": "SAM ViT-B"}
    return _text_route(paths.detector, paths.segmenter, names, image, sha)


def _mm_grounded(image: Any, sha: str) -> dict[str, Any]:
    paths = ensure_models()
    names = {"detector": "MM-GroundingDINO tiny", "segmenter": "SAM ViT-B"}
    return _text_route(MODELS_DIR / MM_GDINO_FOLDER, paths.segmenter, names, image, sha)


def _owlv2(image: Any, sha: str) -> dict[str, Any]:
    paths = ensure_models()
    names = {"detector": "OWLv2 base/16, 960 px", "segmenter": "SAM ViT-B"}
    return _text_route(MODELS_DIR / OWLV2_FOLDER, paths.segmenter, names, image, sha)


def _sam_hq(image: Any, sha: str) -> dict[str, Any]:
    paths = ensure_models()
    names = {"detector": "GroundingDINO-T", "segmenter": "SAM-HQ ViT-B"}
    return _text_route(paths.detector, MODELS_DIR / SAM_HQ_FOLDER, names, image, sha)


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
    from backend.config import Settings
    from backend.models.registry import load_segmenter

    load, segmenter = _measured(
        lambda: load_segmenter(Settings(segmenter_model=str(MODELS_DIR / SAM2_FOLDER), device="cpu"))
    )
    timer = ForwardTimer({"encoder": segmenter.model.vision_encoder})
    encoder, embedding = _measured(lambda: segmenter.embed(image))
    return {
        "models": {"segmenter": f"Sam2Model hiera-tiny ({_parameters(segmenter.model)})"},
        "load": load,
        "image_encoder": encoder,
        "raw_forwards": {"encoder_s": timer.reset()["encoder"]},
        "single_box": _boxes(segmenter, embedding),
        "warm_click": _clicks(segmenter, embedding),
    }


_WORKERS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "grounded": _grounded,
    "mm-grounded": _mm_grounded,
    "owlv2": _owlv2,
    "sam-hq": _sam_hq,
    "sam2": _sam2,
    "sam3": _sam3,
    "sam3-naive": _sam3_naive,
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


def _build_sam2(folder: Path) -> None:
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    Sam2Model(Sam2Config()).save_pretrained(folder)  # the default config is hiera-tiny
    Sam2Processor(image_processor=Sam2ImageProcessor()).save_pretrained(folder)


def _build_sam3(folder: Path) -> None:
    from transformers import (
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

    # the real sizes (ViT-L/14 at 1008 px, CLIP text encoder); a test tokenizer: text-encoder
    # cost depends on the padded length (always 32), not the vocabulary
    save_sam3_hub_checkpoint(
        folder,
        Sam3Model(Sam3Config()),
        Sam3TrackerModel(Sam3TrackerConfig()),
        Sam3TrackerVideoConfig(),
        Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=clip_tokenizer(LABEL_WORDS, 32)),
    )


def _build_mm_grounding_dino(folder: Path) -> None:
    from transformers import (
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
    )

    from tests.tiny_models import build_bert_tokenizer

    # the default config is the tiny one (Swin-T + bert-base, 900 queries, 6+6 layers)
    MMGroundingDinoForObjectDetection(MMGroundingDinoConfig()).save_pretrained(folder)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(), tokenizer=build_bert_tokenizer(LABEL_WORDS)
    ).save_pretrained(folder)


def _build_owlv2(folder: Path) -> None:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from tests.tiny_models import clip_tokenizer

    # google/owlv2-base-patch16(-ensemble): the default towers (text 512 x 12, 16 tokens;
    # vision ViT-B/16) at 960 px (60 x 60 patches = 3600 box queries); the real vocabulary
    # size, a test tokenizer (the cost depends on the 16 padded tokens, not on the words)
    tokenizer = clip_tokenizer(LABEL_WORDS, 16)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    config = Owlv2Config(
        text_config={"max_position_embeddings": 16, **ids},
        vision_config={"image_size": 960, "patch_size": 16},
    )
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 960, "width": 960}), tokenizer=tokenizer
    ).save_pretrained(folder)


def _build_sam_hq(folder: Path) -> None:
    from transformers import SamHQConfig, SamHQModel, SamHQProcessor, SamImageProcessor

    from tests.tiny_sam_models import reinit_weights

    # SamHQConfig() is ViT-B (the HQ decoder's vit_dim 768 = the ViT width); weights at std
    # 0.02 like bench.common's SAM, so masks are not empty
    model = SamHQModel(SamHQConfig())
    reinit_weights(model, std=0.02)
    model.save_pretrained(folder)
    SamHQProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    SAM2_FOLDER: _build_sam2,
    SAM3_FOLDER: _build_sam3,
    MM_GDINO_FOLDER: _build_mm_grounding_dino,
    OWLV2_FOLDER: _build_owlv2,
    SAM_HQ_FOLDER: _build_sam_hq,
}


def _build(folders: Sequence[str]) -> None:
    """Save the real-size random models named by ``folders`` under MODELS_DIR."""
    import torch

    for folder in folders:
        torch.manual_seed(0)
        _BUILDERS[folder](MODELS_DIR / folder)


def _ensure_zoo_models(routes: Sequence[str]) -> None:
    ensure_models()
    needed = dict.fromkeys(folder for route in routes for folder in ROUTE_FOLDERS.get(route, ()))
    missing = [folder for folder in needed if not (MODELS_DIR / folder / "config.json").exists()]
    if missing:
        print(f"building real-size random {', '.join(missing)} into {MODELS_DIR} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "bench.zoo", "--build", *missing], check=True)


# -- orchestration --------------------------------------------------------------------------


def _median_of(samples: Sequence[Any]) -> Any:
    """The rounds of one route folded into one result: the median of every number (nested
    dicts too); anything else (names, flags) from the first round."""
    first = samples[0]
    if isinstance(first, dict):
        return {key: _median_of([s[key] for s in samples if key in s]) for key in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    return round(statistics.median(samples), 3)


def _component_row(name: str, result: dict[str, Any]) -> Row | None:
    """Detector call / encoder / per-box decoder of one route, adapter wall (raw forward)."""
    raw = result.get("raw_forwards", {})
    parts = []
    if "detector" in result:
        parts.append(f"detector {result['detector']['wall_s']} s (raw {raw.get('detector_s')} s)")
    if "image_encoder" in result:
        parts.append(f"encoder {result['image_encoder']['wall_s']} s (raw {raw.get('encoder_s')} s)")
    if "per_box_ms" in result:
        parts.append(f"per box {result['per_box_ms']} ms (raw {raw.get('decoder_ms_per_box')} ms)")
    elif "single_box" in result:
        parts.append(f"per box {result['single_box']['median_ms']} ms")
    return Row(f"{name}: detector / encoder / per-box decoder, wall", "", "; ".join(parts)) if parts else None


def _rows(routes: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    grounded, sam3, naive, sam2 = (routes.get(r) for r in ("grounded", "sam3", "sam3-naive", "sam2"))
    for name, result in routes.items():
        rounds = result.get("rounds", 1)
        rows.append(
            Row(
                f"{name}: per image, 3 labels" if "per_image_wall_s" in result else f"{name}: image encoder",
                "",
                (
                    f"{result['per_image_wall_s']} s wall, {result['per_image_cpu_s']} CPU s"
                    if "per_image_wall_s" in result
                    else f"{result['image_encoder']['wall_s']} s wall, {result['image_encoder']['cpu_s']} CPU s"
                )
                + f"; peak RSS {result['peak_rss_mb']} MiB; {result.get('dtype')}; median of {rounds} round(s)",
            )
        )
        component = _component_row(name, result)
        if component:
            rows.append(component)
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
    if grounded:
        for name in ("mm-grounded", "owlv2", "sam-hq", "sam2"):
            other = routes.get(name)
            if not other or other.get("machine", {}).get("time") != grounded.get("machine", {}).get("time"):
                continue  # ratios only between routes measured in the same run
            if "per_image_cpu_s" in other:
                rows.append(
                    Row(
                        f"{name} / grounded, per image (CPU s, same run)",
                        "",
                        str(ratio(other["per_image_cpu_s"], grounded["per_image_cpu_s"])),
                    )
                )
            else:
                rows.append(
                    Row(
                        f"{name} encoder / SAM ViT-B encoder (CPU s, same run)",
                        "",
                        str(ratio(other["image_encoder"]["cpu_s"], grounded["image_encoder"]["cpu_s"])),
                    )
                )
    return rows


def _run_worker(route: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.zoo", "--worker", route], check=False, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"route {route} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(DEFAULT_ROUTES))
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the routes alternate within each")
    parser.add_argument("--worker", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs="+", choices=sorted(_BUILDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        _build(args.build)
        return
    if args.worker:
        _work(args.worker)
        return

    info = machine()
    print_machine(info)
    _ensure_zoo_models(args.routes)
    path = RESULTS_DIR / "zoo.json"
    routes: dict[str, dict[str, Any]] = json.loads(path.read_text())["routes"] if path.exists() else {}
    samples: dict[str, list[dict[str, Any]]] = {route: [] for route in args.routes}
    for round_index in range(args.rounds):
        order = args.routes if round_index % 2 == 0 else list(reversed(args.routes))
        for route in order:
            print(f"round {round_index + 1}/{args.rounds}: {route} (load {load_average()}) ...", flush=True)
            samples[route].append(_run_worker(route))
            print(json.dumps(samples[route][-1]), flush=True)
    for route, route_samples in samples.items():
        routes[route] = {
            **_median_of(route_samples),
            "rounds": len(route_samples),
            "load_average": [s["load_average"] for s in route_samples],
            "per_round": route_samples,
            "machine": info,
        }
    ordered = {route: routes[route] for route in ROUTES if route in routes}
    finish("zoo", info, _rows(ordered), {"routes": ordered})


if __name__ == "__main__":
    main()
