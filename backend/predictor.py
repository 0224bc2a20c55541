"""Tasks in, Label Studio prediction items out: the one code path behind ``/predict``, the batch
CLI and the RQ workers, so all three produce the same regions and the same ``model_version``.

Nothing here knows HTTP. A task that fails becomes an item with ``error`` and no ``result``:
Label Studio skips that item and stores the others (ls-protocol.md).
"""

from __future__ import annotations

import functools
import logging
import statistics
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache
from backend.gate import ModelGate
from backend.images import ImageLoader, ImageLoadError
from backend.labeling import LabelConfigError, OutputControl, ProjectConfig, parse_label_config, split_prompt
from backend.metrics import Metrics
from backend.models.base import ConceptSegmenter, Detector, Segmenter
from backend.models.registry import GROUNDED_SAM, SAM3
from backend.pipelines.everything import (
    AutoModels,
    AutoParams,
    check_mode,
    load_auto_models,
    predict_instances,
)
from backend.pipelines.interactive import (
    InteractiveError,
    RefinementMemory,
    image_embedding,
    parse_context,
    run_clicks,
    run_text_prompt,
)
from backend.pipelines.preannotate import PreannotateParams
from backend.regions import Instance, encode_instance

log = logging.getLogger(__name__)


@dataclass
class Credentials:
    """Where task images of a project live: Label Studio's URL and token from ``/setup``."""

    hostname: str | None = None
    access_token: str | None = None


def model_version_for(settings: Settings, project: ProjectConfig | None, mode: str | None = None) -> str:
    """The version ``/setup`` reports and every item carries: settings plus the project's
    own thresholds, so tuning a project's ``<Number>`` tags re-triggers its predictions; a
    project's own prediction ``mode`` (``/setup`` extra params) replaces PREDICTION_MODE."""
    if mode is not None:
        settings = settings.with_overrides(prediction_mode=check_mode(mode))
    extra = dict(project.thresholds) if project and project.thresholds else None
    return settings.model_version(extra)


class Predictor:
    """Holds the loaded models and the caches; stateless per request otherwise (but for the
    click memory and, with ``REMEMBER_TEXT_PROMPT``, each project's last typed phrase)."""

    max_remembered_projects = 1024

    def __init__(
        self,
        settings: Settings,
        detector: Detector | None,
        segmenter: Segmenter,
        cache: EmbeddingCache,
        images: ImageLoader,
        metrics: Metrics | None = None,
        auto_models: AutoModels | None = None,
        concept_segmenter: ConceptSegmenter | None = None,
    ) -> None:
        """``concept_segmenter`` set (the SAM 3 route) replaces ``detector`` + ``segmenter`` for
        finding the labels' instances; ``segmenter`` still serves clicks and the point grid."""
        check_mode(settings.prediction_mode)
        self.settings = settings
        self.auto_params = AutoParams.from_settings(settings)
        # CLIP / CLIPSeg load here, with the other models, when their settings name them
        self.auto_models = auto_models if auto_models is not None else load_auto_models(settings)
        self.detector = detector
        self.segmenter = segmenter
        self.concept_segmenter = concept_segmenter
        self.pipeline = SAM3 if concept_segmenter is not None else GROUNDED_SAM
        self.cache = cache
        self.images = images
        self.metrics = metrics or Metrics()
        self._parse = functools.lru_cache(maxsize=64)(self._parse_uncached)
        self.memory = RefinementMemory()
        self.gate = ModelGate(settings.interactive_priority_s)  # clicks first (backend/gate.py)
        self._text_prompts: OrderedDict[str, tuple[str, tuple[str, ...]]] = OrderedDict()
        self._text_prompts_lock = threading.Lock()

    def _parse_uncached(self, label_config: str) -> ProjectConfig:
        return parse_label_config(label_config, self.settings.label_prompts, self.settings.label_modes)

    def project(self, label_config: str) -> ProjectConfig:
        """Parsed config, cached by its text (Label Studio sends it with every request)."""
        return self._parse(label_config)

    def project_for(self, label_config: str, project_key: str | None) -> ProjectConfig:
        """The parsed config, with the project's remembered phrase (``REMEMBER_TEXT_PROMPT``)
        replacing its label's prompts when the label is still offered."""
        project = self.project(label_config)
        with self._text_prompts_lock:
            remembered = self._text_prompts.get(project_key) if project_key is not None else None
        if remembered is None or remembered[0] not in project.label_values():
            return project
        return project.with_prompts(*remembered)

    def remember_text_prompt(self, project_key: str | None, label: str, text: str) -> None:
        """Keep ``text`` as the project's phrase for ``label`` (most recent projects only)."""
        if not self.settings.remember_text_prompt or project_key is None:
            return
        phrases = split_prompt(text) or (text,)
        with self._text_prompts_lock:
            self._text_prompts[project_key] = (label, phrases)
            self._text_prompts.move_to_end(project_key)
            while len(self._text_prompts) > self.max_remembered_projects:
                self._text_prompts.popitem(last=False)
        log.info("project %s: remembered phrase %r for label %r", project_key, text, label)

    def params(self, project: ProjectConfig, mode: str | None = None) -> PreannotateParams:
        """Environment thresholds, overridden by the project's ``<Number>`` tags. A project
        that only draws rectangles in the grounded mode gets the detector's boxes without
        running SAM, unless it has smart tags: then pre-annotation still computes the image
        embedding, so the annotator's first click is warm (the everything modes need SAM's
        masks whatever the outputs)."""
        s = self.settings
        grounded_only = check_mode(mode or s.prediction_mode) == "grounded"
        return PreannotateParams(
            box_threshold=project.thresholds.get("box_threshold", s.box_threshold),
            text_threshold=project.thresholds.get("text_threshold", s.text_threshold),
            label_thresholds=s.label_thresholds,
            nms_iou=s.nms_iou,
            cross_label_iou=s.cross_label_iou,
            mask_nms_iou=s.mask_nms_iou,
            min_region_area=s.min_region_area,
            max_detections=s.max_detections,
            segment_boxes=not grounded_only
            or bool(project.prompt_controls)
            or any(control.is_mask for control in project.outputs),
        )

    def model_version(self, project: ProjectConfig | None = None, mode: str | None = None) -> str:
        return model_version_for(self.settings, project, mode)

    def model_ids(self) -> dict[str, str]:
        """The loaded model of every role, for /health and /setup."""
        ids: dict[str, str] = {}
        if self.concept_segmenter is not None:
            ids["concept_segmenter"] = self.concept_segmenter.model_id
        if self.detector is not None:
            ids["detector"] = self.detector.model_id
        ids["segmenter"] = self.segmenter.model_id
        if self.auto_models.classifier is not None:
            ids["clip"] = self.auto_models.classifier.model_id
        if self.auto_models.heatmapper is not None:
            ids["clipseg"] = self.auto_models.heatmapper.model_id
        return ids

    def encode(
        self,
        project: ProjectConfig,
        instances: Iterable[Instance],
        width: int,
        height: int,
        controls: Sequence[OutputControl] | None = None,
    ) -> list[dict]:
        """Regions for every output control (default: all of the project's) offering each
        instance's label."""
        regions: list[dict] = []
        instances = list(instances)
        for control in project.outputs if controls is None else controls:
            offered = set(control.label_values())
            for instance in instances:
                if instance.label not in offered:
                    continue
                if control.score_threshold is not None and instance.score < control.score_threshold:
                    continue
                if control.is_mask and instance.mask is None:
                    continue
                encoded = encode_instance(
                    instance,
                    control,
                    width,
                    height,
                    polygon_tolerance=self.settings.polygon_tolerance,
                    min_area=self.settings.min_region_area,
                )
                regions.extend(encoded)
                for region in encoded:
                    if region["from_name"] == control.name:  # a bare tool's <Labels> result is no second region
                        self.metrics.regions.labels(type=region["type"]).inc()
        return regions

    def predict_task(
        self, task: dict[str, Any], project: ProjectConfig, creds: Credentials, mode: str | None = None
    ) -> dict[str, Any]:
        """One prediction item: regions + task score, or an ``error`` item naming the cause.
        ``mode`` (a project's own, from ``/setup``) overrides PREDICTION_MODE."""
        version = self.model_version(project, mode)
        task_id = task.get("id")
        try:
            loaded = self.images.load(task, project.image_value_key, creds.hostname, creds.access_token)
            with self.gate.batch_task():
                instances = predict_instances(
                    mode or self.settings.prediction_mode,
                    loaded.image,
                    loaded.sha256,
                    task,
                    project,
                    self.detector,
                    self.segmenter,
                    self.cache,
                    self.auto_models,
                    self.params(project, mode),
                    self.auto_params,
                    version,
                    self.concept_segmenter,
                    self.metrics.unmatched_phrases.inc,
                )
            regions = self.encode(project, instances, loaded.width, loaded.height)
        except ImageLoadError as exc:
            self.metrics.errors.labels(kind="image").inc()
            self.metrics.tasks.labels(outcome="error").inc()
            log.warning("task %s: %s", task_id, exc)
            return {"error": f"task {task_id}: {exc}", "model_version": version}
        except Exception as exc:  # one bad task must never lose the other tasks' results
            self.metrics.errors.labels(kind="internal").inc()
            self.metrics.tasks.labels(outcome="error").inc()
            log.exception("task %s failed", task_id)
            return {"error": f"task {task_id}: {type(exc).__name__}: {exc}", "model_version": version}
        self.metrics.tasks.labels(outcome="ok").inc()
        return self._item(regions, version)

    def _item(self, regions: list[dict], version: str) -> dict[str, Any]:
        scores = [r["score"] for r in regions if "score" in r]
        return {
            "result": regions,
            "score": round(statistics.fmean(scores), 4) if scores else 0.0,
            "model_version": version,
        }

    def predict_interactive(
        self,
        task: dict[str, Any],
        context: dict[str, Any],
        label_config: str,
        creds: Credentials,
        project_key: str | None = None,
    ) -> dict[str, Any]:
        """One region set for the annotator's clicks/box/phrase on one task; for a
        ``prewarm`` event, no regions but the image embedding cached for the clicks to come.

        Raises ``InteractiveError`` (the caller answers 4xx with its sentence) for a context
        that cannot be turned into a prompt; an unreachable image, and a model that fails on
        this image, are ``error`` items as in batch mode: the failure is the task's, not the
        request's, and Label Studio shows the item's sentence where a 500 shows nothing useful.
        """
        project = self.project(label_config)
        version = self.model_version(project)
        task_id = task.get("id")
        try:
            loaded = self.images.load(task, project.image_value_key, creds.hostname, creds.access_token)
        except ImageLoadError as exc:
            self.metrics.errors.labels(kind="image").inc()
            return {"error": f"task {task_id}: {exc}", "model_version": version}
        try:
            if context.get("event") == "prewarm":
                with self.gate.interactive():
                    image_embedding(loaded.image, loaded.sha256, self.segmenter, self.cache)
                return self._item([], version)
            request = parse_context(context, project, loaded.width, loaded.height)
            with self.gate.interactive():
                if request.text is not None:
                    self.remember_text_prompt(project_key, request.label, request.text)
                    instances = run_text_prompt(
                        request, loaded.image, loaded.sha256, self.detector, self.segmenter, self.cache,
                        self.params(project), self.concept_segmenter,
                    )
                else:
                    instances = run_clicks(
                        request, task, loaded.image, loaded.sha256, self.segmenter, self.cache, self.memory,
                        self.settings.refine_existing,
                    )
            regions = self.encode(project, instances, loaded.width, loaded.height, [request.control])
        except InteractiveError:
            raise  # the context's fault, not the model's: the caller answers 4xx with its sentence
        except Exception as exc:  # the model failed on this task: the batch path's error item
            self.metrics.errors.labels(kind="internal").inc()
            log.exception("task %s: interactive prediction failed", task_id)
            return {"error": f"task {task_id}: {type(exc).__name__}: {exc}", "model_version": version}
        return self._item(regions, version)

    def predict_tasks(
        self,
        tasks: Sequence[dict[str, Any]],
        label_config: str,
        creds: Credentials,
        mode: str | None = None,
        project_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Items in task order; raises ``LabelConfigError`` for a config it cannot serve and
        ``ConfigError`` for an unknown ``mode``."""
        project = self.project_for(label_config, project_key)
        return [self.predict_task(task, project, creds, mode) for task in tasks]


__all__ = ["Credentials", "InteractiveError", "LabelConfigError", "Predictor", "model_version_for"]
