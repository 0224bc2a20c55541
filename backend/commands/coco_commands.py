"""``export-coco``, ``export-yolo``, ``import-coco`` and ``evaluate`` subcommands.

Input is a Label Studio JSON export file or a live project (``--ls-url``, ``--api-key``,
``--project``; the URL and key default to ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``).
JSON exports do not include the label config: pass it with ``--label-config FILE`` so
categories follow the config's order; without it they are the labels seen, sorted (a live
project's config is fetched). Errors are one line on stderr and exit status 1, and no output
file is touched unless the whole conversion succeeded (files are renamed into place).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from backend import coco, yolo
from backend.config import Settings
from backend.labeling import ProjectConfig, parse_label_config

if TYPE_CHECKING:
    from backend.ls_client import LabelStudioClient


@dataclass(frozen=True)
class _Source:
    """Tasks and (when known) the parsed label config of the input project."""

    tasks: list[dict[str, Any]]
    config: ProjectConfig | None


def _client(args: argparse.Namespace) -> LabelStudioClient:
    # imported here: the API client's SDK modules would slow down every ``--help``
    from backend.ls_client import LabelStudioClient

    settings = Settings.from_env()
    return LabelStudioClient(args.ls_url or settings.label_studio_url, args.api_key or settings.label_studio_api_key)


def _label_config_xml(args: argparse.Namespace, client: LabelStudioClient | None) -> str | None:
    """The --label-config file, else the live project's config, else None (a JSON export)."""
    if args.label_config:
        return Path(args.label_config).read_text(encoding="utf-8")
    if client is not None:
        return client.get_label_config(args.project)
    return None


def _load_source(args: argparse.Namespace) -> _Source:
    if (args.input is None) == (args.project is None):
        raise ValueError("give either a Label Studio JSON export file or --project (with --ls-url/--api-key)")
    if args.project is None:
        xml = _label_config_xml(args, None)
        tasks = coco.as_tasks(coco.load_json(args.input), args.input)
    else:
        client = _client(args)
        xml = _label_config_xml(args, client)
        tasks = coco.as_tasks(client.export_tasks(args.project), f"project {args.project}")
    return _Source(tasks, parse_label_config(xml) if xml else None)


def _add_project_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live Label Studio project")
    group.add_argument("--ls-url", help="Label Studio URL (default: LABEL_STUDIO_URL)")
    group.add_argument("--api-key", help="API key or personal access token (default: LABEL_STUDIO_API_KEY)")
    group.add_argument("--project", type=int, help="project id to read instead of an input file")
    parser.add_argument(
        "--label-config",
        help="label config XML file (JSON exports lack it; without it categories are the labels seen, sorted)",
    )


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="Label Studio JSON export file (or use --project)")
    _add_project_args(parser)
    parser.add_argument(
        "--annotations",
        choices=coco.ANNOTATION_CHOICES,
        default="latest",
        help="which annotations per task: the latest, all, or the ground-truth one (default: latest)",
    )


def _add_tolerance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--polygon-tolerance",
        type=float,
        default=1.0,
        help="Douglas-Peucker tolerance in pixels for masks traced as polygons (default: 1.0)",
    )


def _guarded(name: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures into one line on stderr and exit status 1."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as exc:  # CocoError and LabelConfigError are ValueErrors
            message = str(exc)
        except ApiError as exc:
            message = f"Label Studio answered {exc.status_code}: {exc.body}"
        except httpx.HTTPError as exc:
            message = f"cannot reach Label Studio: {exc}"
        print(f"grounded-sam-backend {name}: error: {message}", file=sys.stderr)
        return 1

    return wrapper


def _results_file(path: str) -> list[dict[str, Any]]:
    results = coco.load_json(path)
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise coco.CocoError(f"{path} is not a COCO results file (expected a list of objects)")
    if results and not any("image_id" in r for r in results):  # else every object is "ignored", silently
        raise coco.CocoError(f"{path} is not a COCO results file: no object has an image_id (a Label Studio export?)")
    return results


# --------------------------------------------------------------------------- export-coco


def _export_coco(args: argparse.Namespace) -> int:
    if not args.output and not args.predictions:
        raise ValueError("nothing to write: give --output and/or --predictions")
    source = _load_source(args)
    dataset = results = None
    if args.output:
        dataset = coco.ls_to_coco(
            source.tasks,
            source.config,
            segmentation=args.segmentation,
            annotations=args.annotations,
            keep_paths=args.keep_paths,
            polygon_tolerance=args.polygon_tolerance,
        )
    if args.predictions:
        results = coco.ls_to_coco_results(source.tasks, source.config, model_version=args.model_version)
    if dataset is not None:
        coco.write_json_atomic(args.output, dataset)
        print(
            f"{args.output}: {len(dataset['images'])} images, {len(dataset['annotations'])} annotations, "
            f"{len(dataset['categories'])} categories"
        )
    if results is not None:
        coco.write_json_atomic(args.predictions, results)
        print(f"{args.predictions}: {len(results)} predicted objects")
    return 0


# --------------------------------------------------------------------------- export-yolo


def _export_yolo(args: argparse.Namespace) -> int:
    source = _load_source(args)
    dataset = coco.ls_to_coco(source.tasks, source.config, annotations=args.annotations, keep_paths=args.keep_paths)
    files = yolo.write_yolo(dataset, args.output, args.polygon_tolerance)
    print(f"{args.output}: {len(files) - 1} label files, {len(dataset['annotations'])} objects, data.yaml")
    return 0


# --------------------------------------------------------------------------- import-coco


def _import_coco(args: argparse.Namespace) -> int:
    xml = _label_config_xml(args, _client(args) if args.project is not None else None)
    if not xml:
        raise ValueError("import needs the target label config: --label-config FILE or --project")
    config = parse_label_config(xml)
    dataset = coco.load_json(args.coco)
    results = _results_file(args.results) if args.results else None
    tasks = coco.coco_to_ls(
        dataset,
        config,
        image_root=args.images,
        results=results,
        as_annotations=args.as_annotations,
        model_version=args.model_version,
        polygon_tolerance=args.polygon_tolerance,
    )
    coco.write_json_atomic(args.output, tasks)
    print(f"{args.output}: {len(tasks)} tasks")
    return 0


# --------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    if args.coco and args.results:
        gt, results = coco.load_json(args.coco), _results_file(args.results)
    else:
        source = _load_source(args)
        if args.coco:
            gt = coco.load_json(args.coco)
        else:
            gt = coco.ls_to_coco(source.tasks, source.config, annotations=args.annotations)
        if args.results:
            results = _results_file(args.results)
        else:
            results = coco.ls_to_coco_results(source.tasks, source.config, model_version=args.model_version)
    report = coco.evaluate(gt, results, iou_threshold=args.iou_threshold, score_threshold=args.score_threshold)
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    if args.json:
        coco.write_text_atomic(args.json, json.dumps(report, indent=2))
    print(coco.format_evaluation(report))
    return 0


# --------------------------------------------------------------------------- registration


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the COCO / YOLO subcommands to the CLI's subparsers."""
    export = subparsers.add_parser(
        "export-coco",
        help="Label Studio annotations -> COCO instances (exact RLE masks), predictions -> COCO results",
        description="Export annotations as a COCO instances file and, with --predictions, the stored "
        "predictions as a COCO results file. Brush masks are exact compressed RLE.",
    )
    _add_source_args(export)
    export.add_argument("-o", "--output", help="COCO instances JSON to write")
    export.add_argument(
        "--segmentation",
        choices=coco.SEGMENTATION_MODES,
        default="rle",
        help="brush/bitmask masks as exact RLE (default; export -> import-coco -> export is identical), or "
        "as polygons (outer rings, holes filled, simplified by --polygon-tolerance: lossy, so brush/bitmask "
        "regions are re-traced, not identical, after a round trip; polygons and rectangles are)",
    )
    export.add_argument("--predictions", metavar="OUT", help="also write the predictions as a COCO results file")
    export.add_argument("--model-version", help="only predictions of this model version")
    export.add_argument(
        "--keep-paths",
        action="store_true",
        help="file_name = the task's image path/URL as stored in Label Studio",
    )
    _add_tolerance(export)
    export.set_defaults(func=_guarded("export-coco", _export_coco))

    export_yolo = subparsers.add_parser(
        "export-yolo",
        help="Label Studio annotations -> YOLO segmentation labels + data.yaml",
        description="One label file per image with one polygon per object (parts and holes joined by "
        "zero-width bridges; see backend/yolo.py) and data.yaml with the class names.",
    )
    _add_source_args(export_yolo)
    export_yolo.add_argument("-o", "--output", required=True, help="output directory")
    export_yolo.add_argument(
        "--keep-paths", action="store_true", help="name label files after the stored image path's basename"
    )
    _add_tolerance(export_yolo)
    export_yolo.set_defaults(func=_guarded("export-yolo", _export_yolo))

    importer = subparsers.add_parser(
        "import-coco",
        help="COCO dataset (+ results) -> Label Studio tasks JSON with predictions or annotations",
        description="Write Label Studio import JSON: one task per COCO image, objects as brush RLE, "
        "polygons or rectangles according to the target label config.",
    )
    importer.add_argument("coco", help="COCO instances JSON (images, categories, annotations)")
    _add_project_args(importer)
    importer.add_argument(
        "--results",
        help="COCO results JSON: becomes the predictions (with scores) instead of the annotations",
    )
    importer.add_argument(
        "--images",
        default="",
        help="prefix joined with each file_name for task data, e.g. /data/local-files/?d=dataset/images/ "
        "or https://host/images/ (default: the file_name as is)",
    )
    importer.add_argument("-o", "--output", required=True, help="Label Studio tasks JSON to write")
    importer.add_argument(
        "--as-annotations",
        action="store_true",
        help="import the dataset's objects as annotations (ground truth to review) instead of predictions",
    )
    importer.add_argument(
        "--model-version",
        default=coco.DEFAULT_MODEL_VERSION,
        help=f"model_version of the predictions (default: {coco.DEFAULT_MODEL_VERSION})",
    )
    _add_tolerance(importer)
    importer.set_defaults(func=_guarded("import-coco", _import_coco))

    evaluate = subparsers.add_parser(
        "evaluate",
        help="COCOeval (segm and bbox) of predictions against annotations",
        description="AP, AP50, AP75 and per-label AP for masks and boxes, mean mask IoU of matched "
        "pairs, missed and extra objects per label. Ground truth and predictions come from the "
        "Label Studio input unless --coco / --results give files.",
    )
    _add_source_args(evaluate)
    evaluate.add_argument("--coco", help="ground truth COCO instances JSON instead of the input's annotations")
    evaluate.add_argument("--results", help="COCO results JSON instead of the input's predictions")
    evaluate.add_argument("--model-version", help="only predictions of this model version")
    evaluate.add_argument(
        "--iou-threshold", type=float, default=0.5, help="IoU for matched/missed/extra counts (default: 0.5)"
    )
    evaluate.add_argument(
        "--score-threshold", type=float, default=0.0, help="ignore lower scores in the counts (AP uses all)"
    )
    evaluate.add_argument("--json", metavar="OUT", help="also write the report as JSON ('-': JSON on stdout only)")
    evaluate.set_defaults(func=_guarded("evaluate", _evaluate))
