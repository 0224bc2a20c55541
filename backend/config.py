"""Every setting of the backend, read from environment variables in one place.

The README's configuration table lists the same names and defaults; ``Settings.from_env``
is the only code that reads ``os.environ`` for them, so a test builds a ``Settings`` directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


class ConfigError(ValueError):
    """A setting has a value the backend cannot use; the message names the variable."""


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def _parse_json_mapping(name: str, raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Field names are the lower-case environment variable names."""

    # models
    pipeline: str = "auto"  # auto | grounded-sam | sam3 (auto: sam3 when SEGMENTER_MODEL is a SAM 3 checkpoint)
    detector_model: str = "IDEA-Research/grounding-dino-tiny"
    segmenter_model: str = "facebook/sam-vit-base"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    torch_threads: int = 0  # 0: torch's default
    detector_max_size: int = 0  # longest edge of the detector input, pixels (0: the model's own, 1333)
    # pre-annotation thresholds
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    label_thresholds: Mapping[str, float] = field(default_factory=dict)
    label_prompts: Mapping[str, Any] = field(default_factory=dict)
    nms_iou: float = 0.5
    cross_label_iou: float = 0.95
    mask_nms_iou: float = 0.0  # 0 disables mask-IoU suppression
    min_region_area: int = 0  # pixels; 0 keeps every island and hole
    polygon_tolerance: float = 1.0  # pixels (Douglas-Peucker epsilon)
    max_detections: int = 100
    segmenter_batch_size: int = 0  # prompt sets per SAM decoder call; 0: by device (CPU 1, CPU with bf16 2, CUDA 16)
    refine_existing: bool = True  # a click inside an existing same-label region refines it
    remember_text_prompt: bool = False  # the project's last smart-TextArea phrase re-applies to its next tasks
    # prediction mode and "segment everything" (segment-anything's automatic mask generator)
    prediction_mode: str = "grounded"  # grounded | everything | grounded+everything
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    # labelling automatic masks
    label_match_iou: float = 0.5  # mask box vs. detector box IoU that gives the mask the box's label
    clip_model: str = ""  # empty: no CLIP zero-shot labelling
    clip_threshold: float = 0.5
    unlabeled_label: str = ""  # empty: masks no label claims are dropped
    # "stuff" labels through CLIPSeg
    clipseg_model: str = ""  # empty: stuff labels go to the detector like any label
    label_modes: Mapping[str, str] = field(default_factory=dict)  # label -> "thing" | "stuff"
    clipseg_threshold: float = 0.5
    clipseg_refine_points: int = 0  # >0: refine each stuff mask with SAM from this many points
    # semi-automatic complement and coverage
    skip_existing_masks: bool = False
    existing_overlap_thresh: float = 0.5
    non_overlapping_masks: bool = False
    # images
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    allow_local_files: bool = False
    local_files_root: str = ""
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 50 * 1024 * 1024
    download_timeout_s: float = 30.0
    image_cache_dir: str = ""
    allowed_image_hosts: str = ""  # comma-separated hosts / IP networks exempt from the SSRF guard
    # embedding cache
    embedding_cache_mb: int = 1024
    embedding_cache_dir: str = ""
    embedding_cache_gb: float = 10.0
    # server
    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    threads: int = 8
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    model_wait_s: float = 60.0
    interactive_priority_s: float = 2.0  # a batch task yields to clicks at most this long
    max_request_mb: int = 64
    max_tasks_per_request: int = 1000  # more tasks in one /predict -> 413
    predict_time_budget_s: float = 75.0  # /predict defers the tasks it cannot finish in time; 0: no budget
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); unset names keep defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        defaults = cls()
        for spec in fields(cls):
            name = spec.name.upper()
            if name not in env:
                continue
            raw = env[name]
            default = getattr(defaults, spec.name)
            try:
                if isinstance(default, bool):
                    values[spec.name] = _parse_bool(name, raw)
                elif isinstance(default, int):
                    values[spec.name] = int(raw)
                elif isinstance(default, float):
                    values[spec.name] = float(raw)
                elif isinstance(default, Mapping):
                    values[spec.name] = _parse_json_mapping(name, raw)
                else:
                    values[spec.name] = raw
            except ValueError as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"{name}={raw!r}: {exc}") from exc
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        # 0 is "no budget"; a negative (or NaN) budget is a mistake, refused where it is read.
        if not self.predict_time_budget_s >= 0:
            raise ConfigError(
                f"PREDICT_TIME_BUDGET_S={self.predict_time_budget_s} must be >= 0 (0: no time budget)"
            )

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def model_version(self, extra: Mapping[str, Any] | None = None) -> str:
        """A version string that changes when, and only when, what decides the output changes.

        Label Studio re-sends tasks only when this string changes, so it hashes the model ids
        and every threshold (plus per-project ``extra`` such as thresholds from the config),
        and leaves out server settings that do not change predictions (and the automatic-mask
        settings while ``prediction_mode`` does not use them).

        It reads ``<route>-<mode>-<hash>`` (``grounded-sam-grounded-1a2b3c4d5e``,
        ``sam3-everything-...``) so the Data Manager shows which route and mode made a
        prediction. The prefix only spells out what the hash already covers (``pipeline`` and
        ``prediction_mode`` are hashed as set), so the string changes exactly when the hash does.
        """
        mode = "".join(self.prediction_mode.lower().split())  # as check_mode normalises it
        everything = "everything" in self.prediction_mode
        decisive = {
            key: value
            for key, value in asdict(self).items()
            if key in _OUTPUT_DECIDING_FIELDS and (everything or key not in _EVERYTHING_ONLY_FIELDS)
        }
        if extra:
            decisive["extra"] = dict(extra)
        digest = hashlib.sha1(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()
        return f"{_route(self.pipeline, self.segmenter_model)}-{mode}-{digest[:10]}"


def _route(pipeline: str, segmenter_model: str) -> str:
    """The pre-annotation route ``PIPELINE`` names; ``auto`` resolved as the model loader
    resolves it (from the segmenter checkpoint's ``model_type``), so ``/setup``, ``/predict``
    and the batch CLI all print the route the models actually run."""
    choice = pipeline.strip().lower()
    if choice != "auto":
        return choice
    return _auto_route(segmenter_model)


@functools.lru_cache(maxsize=16)
def _auto_route(segmenter_model: str) -> str:
    """``PIPELINE=auto``'s route for ``segmenter_model``, read once per process: it opens the
    checkpoint's config (a hub id may mean a network round trip, or minutes of retries when
    offline) and the version is computed on every request.

    An unreadable checkpoint gives ``grounded-sam``, cached too: the models are loaded once
    per process from that same config, so they fail to load as well and no prediction carries
    this version (only models that are not files, the tests' fakes, get here and stay here).
    """
    from backend.models.loading import ModelLoadError  # torch/transformers: only when needed
    from backend.models.registry import resolve_pipeline

    try:
        return resolve_pipeline(Settings(pipeline="auto", segmenter_model=segmenter_model))
    except ModelLoadError:
        return "grounded-sam"


_OUTPUT_DECIDING_FIELDS = {
    "pipeline",
    "detector_model",
    "detector_max_size",
    "segmenter_model",
    "dtype",
    "box_threshold",
    "text_threshold",
    "label_thresholds",
    "label_prompts",
    "nms_iou",
    "cross_label_iou",
    "mask_nms_iou",
    "min_region_area",
    "polygon_tolerance",
    "max_detections",
    "prediction_mode",
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
    "label_match_iou",
    "clip_model",
    "clip_threshold",
    "unlabeled_label",
    "clipseg_model",
    "label_modes",
    "clipseg_threshold",
    "clipseg_refine_points",
    "skip_existing_masks",
    "existing_overlap_thresh",
    "non_overlapping_masks",
}

# Settings of the point-grid pipeline alone: they decide nothing in ``grounded`` mode.
_EVERYTHING_ONLY_FIELDS = {
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
    "label_match_iou",
    "clip_model",
    "clip_threshold",
    "unlabeled_label",
    "skip_existing_masks",
    "existing_overlap_thresh",
}
