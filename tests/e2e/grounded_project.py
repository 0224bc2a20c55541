"""The Label Studio project the backend's end-to-end tests share: a label config with every
output and prompt tag the backend serves, real image files, and the steps that connect the
backend and store its predictions.

Every image has its own displayed size, so a prediction stored on the wrong task (results out
of task order) is caught by its ``original_width`` / ``original_height``. One JPEG carries EXIF
orientation 6: its pixels are stored landscape and Label Studio displays it portrait, the size
its regions must use.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import requests
from PIL import Image, ImageDraw

from .label_studio import LSApi

LABELS = ("cat", "dog")
# Control name -> result type; both RectangleLabels receive detector boxes, the smart one is
# also the box prompt of interactive calls.
OUTPUT_TYPES = {
    "brush": "brushlabels",
    "bitmask": "bitmasklabels",
    "polygon": "polygonlabels",
    "box": "rectanglelabels",
    "smart_box": "rectanglelabels",
}
MASK_CONTROLS = ("brush", "bitmask")
_LABEL_TAGS = "".join(f'<Label value="{label}"/>' for label in LABELS)
_SMART_LABEL_TAGS = "".join(f'<Label value="{label}" smart="true"/>' for label in LABELS)
_CONTROL_TAGS = {
    "brush": f'<BrushLabels name="brush" toName="image">{_LABEL_TAGS}</BrushLabels>',
    "bitmask": f'<BitmaskLabels name="bitmask" toName="image">{_LABEL_TAGS}</BitmaskLabels>',
    "polygon": f'<PolygonLabels name="polygon" toName="image">{_LABEL_TAGS}</PolygonLabels>',
    "box": f'<RectangleLabels name="box" toName="image">{_LABEL_TAGS}</RectangleLabels>',
    "click": f'<KeyPointLabels name="click" toName="image" smart="true">{_SMART_LABEL_TAGS}</KeyPointLabels>',
    "smart_box": f'<RectangleLabels name="smart_box" toName="image" smart="true">{_SMART_LABEL_TAGS}</RectangleLabels>',
}


def label_config(*controls: str) -> str:
    """A config with the image and the named controls (all of them when none is named)."""
    tags = "\n  ".join(_CONTROL_TAGS[name] for name in controls or _CONTROL_TAGS)
    return f'<View>\n  <Image name="image" value="$image"/>\n  {tags}\n</View>'


LABEL_CONFIG = label_config()

EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # "rotate 90° clockwise to display": a W x H file displays as H x W


class ImageFile(NamedTuple):
    path: Path
    displayed: tuple[int, int]  # (width, height) after EXIF orientation: what Label Studio shows


def _scene(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like picture: a noisy gradient with two filled shapes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, np.full_like(xs, 90.0)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.2, width * 0.5, height * 0.7), fill=(220, 180, 40))
    draw.rectangle((width * 0.55, height * 0.4, width * 0.9, height * 0.9), fill=(40, 60, 200))
    return image


def write_images(folder: Path) -> list[ImageFile]:
    """A landscape PNG, a square JPEG and a JPEG stored 72x40 with EXIF orientation 6 (shown
    40x72): three different displayed sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    landscape = folder / "landscape.png"
    _scene(64, 48, seed=1).save(landscape)
    square = folder / "square.jpg"
    _scene(56, 56, seed=2).save(square, quality=92)
    rotated = folder / "rotated-exif6.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    _scene(72, 40, seed=3).save(rotated, quality=92, exif=exif.tobytes())
    return [ImageFile(landscape, (64, 48)), ImageFile(square, (56, 56)), ImageFile(rotated, (40, 72))]


class PreannotatedProject(NamedTuple):
    id: int
    ml_id: int
    tasks: list[dict[str, Any]]  # in task id order, as Label Studio lists them
    sizes: dict[int, tuple[int, int]]  # task id -> displayed (width, height)
    files: dict[int, str]  # task id -> uploaded file name
    # Batch /predict calls the backend answered from import to retrieval, and the tasks they
    # carried (its gsb_predict_tasks_per_request histogram): the task-order check needs one call.
    predict_calls: int
    predicted_tasks: int


def predict_batches(backend_url: str) -> tuple[int, int]:
    """(batch /predict calls, tasks they carried) so far, from the backend's ``/metrics``."""
    totals = {"gsb_predict_tasks_per_request_count": 0.0, "gsb_predict_tasks_per_request_sum": 0.0}
    for line in requests.get(f"{backend_url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in totals:
            totals[name] = float(value)
    return int(totals["gsb_predict_tasks_per_request_count"]), int(totals["gsb_predict_tasks_per_request_sum"])


def _file_of(task: dict[str, Any], images: list[ImageFile]) -> ImageFile:
    """Label Studio stores uploads as ``/data/upload/<project>/<8 hex>-<name>``."""
    stored = task["data"]["image"]
    matches = [image for image in images if stored.endswith(f"-{image.path.name}")]
    assert len(matches) == 1, (stored, [image.path.name for image in images])
    return matches[0]


def wait_connected(api: LSApi, project_id: int, ml_id: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """The backend as Label Studio lists it once its state is "CO" (connected); AssertionError
    with the last listing otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = {backend["id"]: backend for backend in api.ml_backends(project_id)}
        backend = listed.get(ml_id)
        if backend and backend["state"] == "CO":
            return backend
        if time.monotonic() > deadline:
            raise AssertionError(f"ML backend {ml_id} not connected after {timeout_s:.0f} s: {listed}")
        time.sleep(1)


def create_preannotated_project(
    api: LSApi, backend_url: str, folder: Path, title: str, config: str = LABEL_CONFIG
) -> PreannotatedProject:
    """Create the project, connect the backend (interactive on), upload the images and have
    Label Studio retrieve predictions for all tasks in one /predict call."""
    images = write_images(folder)
    project_id = api.create_project(title, config)["id"]
    ml_id = api.connect_ml(project_id, backend_url, interactive=True, title="grounded-sam e2e")
    wait_connected(api, project_id, ml_id)
    calls_before, tasks_before = predict_batches(backend_url)
    imported = api.import_files(project_id, [image.path for image in images])
    assert imported["task_count"] == len(images), imported
    api.retrieve_predictions(project_id)
    calls_after, tasks_after = predict_batches(backend_url)
    tasks = api.list_tasks(project_id)
    by_task = {task["id"]: _file_of(task, images) for task in tasks}
    return PreannotatedProject(
        id=project_id,
        ml_id=ml_id,
        tasks=tasks,
        sizes={tid: image.displayed for tid, image in by_task.items()},
        files={tid: image.path.name for tid, image in by_task.items()},
        predict_calls=calls_after - calls_before,
        predicted_tasks=tasks_after - tasks_before,
    )
