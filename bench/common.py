"""Shared helpers of the benchmarks: the machine, real-size random models, timing, output.

Timings on the machines this project runs on are noisy (two shared cores, other jobs beside
the bench) and the CPU itself changes from day to day (AVX-512 + AVX512_BF16 one day, AVX2
only the next, with bfloat16 2x faster on the first and 4x slower on the second). So every
bench here:

* prints the CPU (model, capability, bf16 support) and the load average at start and end
  (:func:`machine`, :func:`load_average`);
* runs the variants it compares alternately in one process (:func:`alternate`) and reports
  medians and ratios taken in that same run, next to the absolute times.

The models are the real architectures with random weights (speed does not depend on weight
values): ``SamModel(SamConfig())`` is SAM ViT-B, ``GroundingDinoForObjectDetection(
GroundingDinoConfig())`` is GroundingDINO-T (Swin-T + bert-base). They are built once into
:data:`MODELS_DIR` by a subprocess (:func:`ensure_models`), so a bench process only *loads*
them with ``from_pretrained`` -- the production path -- and its peak RSS is that of a server,
not of a model builder.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RESULTS_DIR = Path(__file__).parent / "results"
MODELS_DIR = Path(os.environ.get("BENCH_MODELS_DIR", Path.home() / ".cache" / "grounded-sam-backend" / "bench-models"))
SAM_FOLDER = "sam-vit-base-random"
DETECTOR_FOLDER = "grounding-dino-tiny-random"
LABEL_WORDS = ("cat", "dog", "person")

T = TypeVar("T")


# -- the machine ----------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: above the core count, timings are inflated."""
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What decides the speed of this run: CPU facts (with the bf16 decision), torch, load."""
    import torch

    from backend.models.loading import describe_cpu

    return {
        "cpu": describe_cpu(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_machine(info: Mapping[str, Any]) -> None:
    cpu = info["cpu"]
    print(
        f"CPU: {cpu['model_name']} ({cpu['family_model']}), {cpu['logical_cpus']} logical CPUs, "
        f"capability {cpu['capability']}, avx512_bf16={cpu['avx512_bf16']} amx={cpu['amx']} "
        f"-> bf16 native={cpu['bf16_native']}, DTYPE=auto is {cpu['auto_dtype']}; "
        f"torch {info['torch']} threads={cpu['torch_threads']}"
    )
    print(f"load average at start: {info['load_average']}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- timing ---------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall seconds of one call and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternate(variants: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each variant, run A, B, C, A, B, C... for ``rounds`` rounds.

    Interleaving spreads the load of other jobs over all variants alike; the order is
    reversed every other round so no variant always runs right after the same neighbour.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(timed(variants[name])[0])
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median (what the tables report), p95, min and count of wall-time samples, in seconds."""
    return {
        "median_s": round(statistics.median(samples), 4),
        "p95_s": round(percentile(samples, 95), 4),
        "min_s": round(min(samples), 4),
        "n": len(samples),
    }


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2) if denominator > 0 else float("inf")


class ForwardTimer:
    """Adds up the wall time spent inside the forwards of named modules (forward hooks), so a
    pipeline run reports its raw model time next to its total: the difference is everything
    the backend adds (pre/post-processing, upsampling, encoding, HTTP)."""

    def __init__(self, modules: Mapping[str, Any]) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(modules, 0.0)
        self._started: dict[str, float] = {}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda *_, name=name: self._enter(name))
            module.register_forward_hook(lambda *_, name=name: self._leave(name))

    def _enter(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _leave(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._started.pop(name)

    def reset(self) -> dict[str, float]:
        """The totals so far (rounded), then zero."""
        totals = {name: round(value, 4) for name, value in self.seconds.items()}
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        return totals


# -- output ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of a results table: a target next to what this run achieved."""

    what: str
    target: str
    achieved: str
    met: bool | None = None  # None: nothing to compare (an informational row)


def table(rows: Sequence[Row]) -> str:
    """Markdown table (pastes into the README's performance section as is)."""
    marks = {True: "yes", False: "**no**", None: ""}
    lines = ["| what | target | achieved | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.what} | {r.target} | {r.achieved} | {marks[r.met]} |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, payload: Mapping[str, Any], rows: Sequence[Row]) -> Path:
    """``bench/results/<name>.json`` (payload + the table rows) and ``<name>.md`` (the table)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {**payload, "table": [r.__dict__ for r in rows]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    cpu = payload["machine"]["cpu"]
    header = (
        f"CPU: {cpu['model_name']} ({cpu['family_model']}, {cpu['capability']}, "
        f"bf16 native: {cpu['bf16_native']}), load average {payload['machine']['load_average']} -> "
        f"{payload.get('load_average_end')}\n\n"
    )
    (RESULTS_DIR / f"{name}.md").write_text(header + table(rows) + "\n")
    return path


def finish(name: str, info: Mapping[str, Any], rows: Sequence[Row], results: Mapping[str, Any]) -> Path:
    """The end of every bench: the load average at the end (next to the one printed at the
    start, it tells whether other jobs inflated this run), the table, then the result files
    with the machine, both load averages and the time it finished around ``results``."""
    end_load = load_average()
    print(f"load average at end: {end_load}")
    print(table(rows))
    payload = {
        "machine": info,
        "load_average_end": end_load,
        **results,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = write_result(name, payload, rows)
    print(f"wrote {path}")
    return path


# -- inputs ---------------------------------------------------------------------------------


def synthetic_image(width: int = 1024, height: int = 768, seed: int = 0) -> Image.Image:
    """A photo-like picture (smooth background, a few blurred shapes, mild noise).

    Pure noise would make JPEG/PNG decoding and the mask RLE unrealistically expensive; flat
    colours would make them unrealistically cheap.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 60 * np.sin(x / (150 + 40 * c) + c) * np.cos(y / (120 + 30 * c)) for c in range(3)], axis=-1
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        w, h = int(rng.integers(80, 300)), int(rng.integers(80, 300))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# -- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPaths:
    segmenter: Path
    detector: Path


def ensure_models(root: Path = MODELS_DIR) -> ModelPaths:
    """The saved random SAM ViT-B and GroundingDINO-T folders, built by a subprocess if missing.

    Building takes a minute and ~1.1 GB of disk; the folders are reused by every later run.
    """
    paths = ModelPaths(root / SAM_FOLDER, root / DETECTOR_FOLDER)
    if not all((p / "config.json").exists() for p in (paths.segmenter, paths.detector)):
        print(f"building real-size random models into {root} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "bench.common", "build", str(root)], check=True)
    return paths


def _build(root: Path) -> None:
    """Save SAM ViT-B and GroundingDINO-T with random weights (+ their processors) under ``root``.

    SAM's weights are re-initialised at std 0.02: HF SAM's own init (std 1e-10 in places) makes
    every mask logit ~0, so masks would be empty and the post-processing and RLE encoding, which
    depend on mask content, would be measured on nothing.
    """
    import torch
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
    )

    from tests.tiny_models import build_bert_tokenizer
    from tests.tiny_sam_models import reinit_weights

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sam = SamModel(SamConfig())
    reinit_weights(sam, std=0.02)
    sam.save_pretrained(root / SAM_FOLDER)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(root / SAM_FOLDER)
    del sam
    detector = GroundingDinoForObjectDetection(GroundingDinoConfig())  # Swin-T + bert-base: GroundingDINO-T
    detector.save_pretrained(root / DETECTOR_FOLDER)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(), tokenizer=build_bert_tokenizer(LABEL_WORDS)
    ).save_pretrained(root / DETECTOR_FOLDER)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        _build(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.common build DIR")
