"""Label Studio's own labeling page, in a real browser, shows what this backend stored: every
predicted region is listed in the regions panel, and the bitmask prediction draws its mask where
the mask is, on the EXIF-rotated image as displayed.

Debian's Chromium driven by Playwright (never a browser download). Without /usr/bin/chromium
(``.ci/run`` installs it) the test is skipped, its reason in the -rs summary. Screenshots are kept
under ``tests/artifacts/`` for CI.
"""

from __future__ import annotations

import io
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from backend.labeling import parse_label_config
from backend.regions import Instance, decode_region_mask, encode_instance

from .backend_server import BackendServer
from .conftest import LabelStudio
from .grounded_project import PreannotatedProject, create_preannotated_project, label_config, write_images
from .label_studio import REPO_ROOT

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
# The environment's flags: the machine has no network, and Chromium's background services would
# otherwise try (and fail) to reach Google at every start. Playwright adds --headless and a fresh
# profile (--user-data-dir) itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# No PolygonLabels: random masks are speckled into hundreds of polygon regions, and the panel
# renders only the rows that fit on screen.
CONFIG = label_config("brush", "bitmask", "box")
NODE_TYPES = {"brushlabels": "brushregion", "bitmasklabels": "bitmaskregion", "rectanglelabels": "rectangleregion"}
# a bare tool labelled by a separate <Labels>: Label Studio keeps each region as two results.
# smoothing="false", as the Bitmask tag's documentation asks: mask pixels drawn as crisp squares
BARE_BITMASK_CONFIG = """<View><Image name="image" value="$image" smoothing="false"/>
  <Labels name="label" toName="image"><Label value="cat"/><Label value="dog"/></Labels>
  <Bitmask name="mask" toName="image"/>
</View>"""
PAGE_TIMEOUT_MS = 120_000  # the first page load compiles Label Studio's bundle on a busy 2-core machine
MIN_BITMASK_IOU = 0.9  # measured 0.997: only the anti-aliased mask edges differ


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        # `make test` runs pytest with -rs, so CI prints this reason.
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def project(
    label_studio: LabelStudio, backend_server: BackendServer, tmp_path_factory: pytest.TempPathFactory
) -> PreannotatedProject:
    return create_preannotated_project(
        label_studio.api, backend_server.url, tmp_path_factory.mktemp("images"), "grounded-sam browser", CONFIG
    )


def _log_in(page: Page, label_studio: LabelStudio) -> None:
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    assert "/user/login" not in page.url, "Label Studio refused the login"


def _listed_regions(page: Page) -> list[tuple[str, str, str]]:
    """(node type, label, score) of every row of the regions panel."""
    rows = page.locator(".lsf-outliner .lsf-tree__node")
    listed = []
    for index in range(rows.count()):
        row = rows.nth(index)
        kind = next(c.split("_type_")[1] for c in row.get_attribute("class").split() if "__node_type_" in c)
        _, label, score = row.inner_text().split("\n")
        listed.append((kind, label, score))
    return listed


def _toggle_visibility(page: Page, node_types: set[str]) -> None:
    """Click the eye of every row of these types (the control appears on hover)."""
    rows = page.locator(".lsf-outliner .lsf-tree__node")
    for index in range(rows.count()):
        row = rows.nth(index)
        if any(f"__node_type_{kind}" in row.get_attribute("class") for kind in node_types):
            row.hover()
            row.locator(".lsf-outliner-item__control_type_visibility button").click()
    time.sleep(1)  # the canvas redraws on the next animation frames


def _stage_pixels(page: Page) -> np.ndarray:
    stage = page.locator(".konvajs-content").first
    return np.asarray(Image.open(io.BytesIO(stage.screenshot())).convert("RGB"), dtype=np.int16)


def _drawn_mask(with_masks: np.ndarray, without: np.ndarray, width: int, height: int) -> np.ndarray:
    """Which image pixels the regions changed, sampled at the image's own resolution. The image
    is drawn at the stage's top left, scaled to fit it (measured on Label Studio 1.23.2)."""
    changed = np.abs(with_masks - without).sum(axis=-1) > 30
    scale = min(changed.shape[1] / width, changed.shape[0] / height)
    ys = ((np.arange(height) + 0.5) * scale).astype(int)
    xs = ((np.arange(width) + 0.5) * scale).astype(int)
    return changed[np.ix_(ys, xs)]


def _open_task(page: Page, label_studio: LabelStudio, project_id: int, task_id: int) -> None:
    _log_in(page, label_studio)
    page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    page.wait_for_selector(".konvajs-content canvas", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_selector(".lsf-outliner .lsf-tree__node", timeout=PAGE_TIMEOUT_MS)


def test_labeling_page_lists_predicted_regions_and_draws_the_bitmask(
    browser: Browser, label_studio: LabelStudio, project: PreannotatedProject
) -> None:
    (task_id,) = [tid for tid, name in project.files.items() if name == "rotated-exif6.jpg"]
    width, height = project.sizes[task_id]
    (prediction,) = label_studio.api.predictions(task_id)
    regions: list[dict[str, Any]] = prediction["result"]
    expected = Counter((NODE_TYPES[r["type"]], r["value"][r["type"]][0], f"{r['score']:.2f}") for r in regions)
    assert {kind for kind, _, _ in expected} == set(NODE_TYPES.values()), expected

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        _open_task(page, label_studio, project.id, task_id)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "label-studio-labeling-page.png"))
        assert Counter(_listed_regions(page)) == expected, f"page errors: {errors}"

        _toggle_visibility(page, {"brushregion", "rectangleregion"})
        only_bitmasks = _stage_pixels(page)
        Image.fromarray(only_bitmasks.astype(np.uint8)).save(ARTIFACTS / "label-studio-bitmask-regions.png")
        _toggle_visibility(page, {"bitmaskregion"})
        drawn = _drawn_mask(only_bitmasks, _stage_pixels(page), width, height)
    finally:
        page.close()

    stored = np.zeros((height, width), dtype=bool)
    for region in regions:
        if region["type"] == "bitmasklabels":
            stored |= np.asarray(decode_region_mask(region), dtype=bool)
    iou = (drawn & stored).sum() / max((drawn | stored).sum(), 1)
    assert iou >= MIN_BITMASK_IOU, f"bitmask drawn vs stored IoU {iou:.3f}; page errors: {errors}"


def test_labeling_page_shows_a_bitmask_and_labels_pair_as_one_labelled_bitmask(
    browser: Browser, label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory
) -> None:
    api = label_studio.api
    # the portrait EXIF image, as in the test above: _drawn_mask's stage mapping is measured on it
    image = write_images(tmp_path_factory.mktemp("bare-bitmask"))[2]
    width, height = image.displayed
    project_id = api.create_project("bare bitmask browser", BARE_BITMASK_CONFIG)["id"]
    api.import_files(project_id, [image.path])
    (task,) = api.list_tasks(project_id)
    mask = np.zeros((height, width), dtype=bool)
    mask[10:60, 5:35] = True
    mask[25:40, 12:24] = False  # a hole
    control = parse_label_config(BARE_BITMASK_CONFIG).outputs[0]
    # "cat": its label colour stands out on every part of the picture (the diff must see it)
    results = encode_instance(Instance("cat", 0.87, (5, 10, 35, 60), mask), control, width, height)
    prediction = {"task": task["id"], "result": results, "score": 0.87, "model_version": "pair"}
    api.request("POST", "/api/predictions/", json=prediction)

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        _open_task(page, label_studio, project_id, task["id"])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "label-studio-bare-bitmask.png"))
        # one region, not two: the editor joined the pair by its id and took the label from <Labels>
        assert _listed_regions(page) == [("bitmaskregion", "cat", "0.87")], f"page errors: {errors}"
        shown = _stage_pixels(page)
        _toggle_visibility(page, {"bitmaskregion"})
        drawn = _drawn_mask(shown, _stage_pixels(page), width, height)
        Image.fromarray(drawn).save(ARTIFACTS / "label-studio-bare-bitmask-drawn.png")
    finally:
        page.close()
    iou = (drawn & mask).sum() / max((drawn | mask).sum(), 1)
    assert iou >= MIN_BITMASK_IOU, f"bitmask drawn vs stored IoU {iou:.3f}; page errors: {errors}"
