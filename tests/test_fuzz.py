"""Malformed bodies for /predict, /setup and /webhook: never a 5xx, never an exception.

Hypothesis generates at least 1,000 bodies for each endpoint (issue 8): arbitrary JSON values
(NaN, infinities, huge integers, unicode, nesting), raw bytes, and valid Label Studio payloads
with one to three parts replaced, removed or wrapped (tasks, data, image references, context
items, value coordinates, ...). Every answer must be a 2xx or 4xx JSON body of the documented shape; no
request may reach the unexpected-exception handler, no task may fail with an internal error,
nothing may be logged at ERROR, and /health must answer afterwards.

Name resolution and outgoing connections are refused for the whole run, so generated URLs
(``http://...``, Label Studio paths with a generated ``/setup`` hostname) fail as per-task
errors without touching any network. The examples are derandomized: CI runs the same bodies
every time, and a failure prints the body that caused it.

The explicit regression tests at the end pin the 500s the fuzzer found.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import socket
from collections import Counter
from typing import Any

import pytest
import urllib3.util.connection
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.config import Settings
from backend.embedding_cache import EmbeddingCache
from backend.images import ImageLoader
from backend.metrics import Metrics
from backend.predictor import Predictor
from backend.regions import decode_region_mask
from tests.conftest import data_uri, png_bytes
from tests.fakes import BoxDetector, BoxFillSegmenter

MIN_BODIES = 1000  # per endpoint
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="cat"/></RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" smart="true"/>
</View>
"""
IMAGE = data_uri(png_bytes(32, 24))


def _task(task_id: int) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": IMAGE}, "project": 3, "annotations": [], "drafts": [],
            "predictions": [{"result": [{"type": "brushlabels", "value": {"format": "rle", "rle": [1, 2, 3],
                                                                            "brushlabels": ["cat"]},
                                         "original_width": 32, "original_height": 24}]}]}


def _predict(context_items: list[dict] | None, tasks: int = 1) -> dict[str, Any]:
    context = {"result": context_items} if context_items else None
    return {"tasks": [_task(i + 1) for i in range(tasks)], "project": "3.1700000000", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": context}}


def _item(kind: str, from_name: str, value: dict) -> dict[str, Any]:
    return {"type": kind, "from_name": from_name, "to_name": "image", "original_width": 32,
            "original_height": 24, "image_rotation": 0, "value": value, "is_positive": True}


VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "/predict": [
        _predict(None, tasks=2),
        _predict([_item("keypointlabels", "kp", {"x": 40.0, "y": 50.0, "width": 0.3, "keypointlabels": ["cat"]}),
                  _item("keypointlabels", "kp", {"x": 60.0, "y": 20.0, "width": 0.3, "keypointlabels": ["cat"]})]),
        _predict([_item("rectanglelabels", "box", {"x": 10.0, "y": 10.0, "width": 50.0, "height": 40.0,
                                                   "rotation": 15, "rectanglelabels": ["cat"]})]),
        _predict([_item("textarea", "prompt", {"text": ["a cat . a dog"]}),
                  _item("keypointlabels", "kp", {"x": 5.0, "y": 5.0, "keypointlabels": ["cat"]})]),
    ],
    "/setup": [{"project": "3.1700000000", "schema": CONFIG, "hostname": "http://ls.invalid:8080",
                "access_token": "0123456789abcdef", "extra_params": {"mode": "grounded"}}],
    "/webhook": [{"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": []}, "task": _task(1),
                  "project": {"id": 3, "label_config": CONFIG}}],
}
ENDPOINTS = tuple(VALID_BODIES)

KEYS = ["tasks", "data", "image", "id", "params", "context", "result", "value", "x", "y", "width", "height",
        "rotation", "type", "from_name", "label_config", "project", "schema", "hostname", "access_token",
        "extra_params", "action", "keypointlabels", "rectanglelabels", "text", "is_positive", "annotations"]
TRICKY: list[Any] = [
    float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, 10**40, -(10**40), 2**63, -1, 0, -0.0, True,
    "", " ", "\x00", "\ud800", "\u202e", "猫", "💥" * 50, "x" * 5000, "NaN", "%", "%%s", "{}", "<View/>",
    "<View><Image name='image' value='$image'/>", "../../etc/passwd", "/etc/passwd", "file:///etc/passwd",
    "http://127.0.0.1:1/x.png", "http://169.254.169.254/", "http://[::1", "http://a:b@c:99999/",
    "/data/upload/1/x.png", "/data/local-files/?d=../../etc/passwd", "/tasks/1/resolve/?fileuri=x",
    "s3://bucket/key.png", "gs://b/k", "data:image/png;base64,!!!", "data:,", "data:image/png;base64," + "A" * 7,
    IMAGE[:60], "keypointlabels", "rectanglelabels", "textarea", "brushlabels", "cat", "3.1", ".", "1.2.3",
]
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(TRICKY)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON document, the root included."""
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, endpoint: str) -> tuple[str, bytes]:
    """A valid body of ``endpoint`` with 1-3 positions replaced, removed, wrapped or emptied."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(VALID_BODIES[endpoint])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(json_values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        operation = draw(st.sampled_from(["replace", "replace", "tricky", "delete", "wrap", "empty"]))
        if operation == "delete":
            del parent[key]
        elif operation == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        elif operation == "empty":
            parent[key] = draw(st.sampled_from([[], {}, "", None, 0]))
        elif operation == "tricky":
            parent[key] = draw(st.sampled_from(TRICKY))
        else:
            parent[key] = draw(json_values)
    return endpoint, json.dumps(doc, allow_nan=True).encode()


def _nested(depth: int) -> bytes:
    return b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = (
    st.binary(max_size=64)
    | st.integers(1, 5000).map(_nested)
    | st.sampled_from(VALID_BODIES["/predict"]).flatmap(
        lambda body: st.integers(0, 200).map(lambda cut: json.dumps(body).encode()[:cut])  # truncated JSON
    )
)



def bodies(endpoint: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """Mutated valid payloads, weighted by how many the endpoint has, arbitrary JSON, raw bytes."""
    return st.one_of(
        *(mutated(endpoint) for _ in VALID_BODIES[endpoint]),
        st.tuples(st.just(endpoint), json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())),
        st.tuples(st.just(endpoint), raw_bodies),
    )


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No name resolves and no connection opens: generated URLs fail as per-task errors."""

    def no_dns(host: object, *args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, f"fuzz run is offline ({host!r})")

    def no_connect(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        raise ConnectionRefusedError(f"fuzz run is offline ({address!r})")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", no_connect)


@pytest.fixture
def client() -> FlaskClient:
    def load(s: Settings, metrics: Metrics) -> Predictor:
        detector = BoxDetector({"cat": [((2.0, 2.0, 20.0, 16.0), 0.8)], "a cat": [((2.0, 2.0, 12.0, 12.0), 0.7)]})
        cache = EmbeddingCache(max_bytes=64 * 1024 * 1024)
        return Predictor(s, detector, BoxFillSegmenter(), cache, ImageLoader(s, backoff_s=0.0), metrics)

    # both batch pipelines (boxes -> masks and the point grid, which reads the task's existing
    # regions with SKIP_EXISTING_MASKS) run on every batch body; a small grid keeps it fast
    settings = Settings(
        max_tasks_per_request=20, prediction_mode="grounded+everything", skip_existing_masks=True, points_per_side=4
    )
    app = create_app(settings, load)
    app.extensions["backend_state"].runtime.get(10)
    return app.test_client()


def _task_count(body: bytes) -> int | None:
    try:
        tasks = json.loads(body).get("tasks")
    except (ValueError, AttributeError, RecursionError):
        return None
    return len(tasks) if isinstance(tasks, list) else None


def check_answer(endpoint: str, body: bytes, response: Any) -> None:
    """The response contract: 2xx or 4xx, JSON, of the endpoint's documented shape."""
    assert response.status_code < 500, (response.status_code, response.get_data(as_text=True)[:500])
    answer = response.get_json(silent=True)
    assert isinstance(answer, dict), response.get_data()[:200]
    if response.status_code >= 400:
        assert answer["status"] == response.status_code and isinstance(answer["detail"], str) and answer["detail"]
        return
    assert response.status_code == 200
    if endpoint == "/setup":
        assert isinstance(answer["model_version"], str) and answer["model_version"]
    elif endpoint == "/webhook":
        assert answer["status"] == "ok"
    else:
        results = answer["results"]
        assert len(results) == _task_count(body)
        for item in results:
            assert isinstance(item["model_version"], str)
            assert isinstance(item.get("result"), list) or isinstance(item.get("error"), str), item
            for region in item.get("result", []):
                assert 0.0 <= region["score"] <= 1.0, region


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_malformed_bodies_never_get_a_5xx(
    offline, client: FlaskClient, caplog: pytest.LogCaptureFixture, endpoint: str
) -> None:
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=MIN_BODIES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=bodies(endpoint))
    def run(case: tuple[str, bytes]) -> None:
        target, body = case
        response = client.post(target, data=body, content_type="application/json")
        sent[target] += 1
        statuses[response.status_code] += 1
        check_answer(target, body, response)

    with caplog.at_level(logging.WARNING):
        run()
    assert sent == {endpoint: sent[endpoint]} and sent[endpoint] >= MIN_BODIES, sent
    assert statuses[200] >= 25 and statuses[400] >= 25, statuses  # both outcomes were exercised
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    metrics = client.get("/metrics").get_data(as_text=True)
    assert not re.search(r'^gsb_errors_total\{kind="internal"\} [1-9]', metrics, re.M)
    assert not re.search(r'^gsb_requests_total\{endpoint="\w+",status="5\d\d"\}', metrics, re.M)
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP" and health.json["model_state"] == "ready"


# ---------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000, _nested(3_000)])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(client: FlaskClient, endpoint: str, body: bytes) -> None:
    response = client.post(endpoint, data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json["detail"] == "the request body is nested too deeply"


@pytest.mark.parametrize("rotation", ["x", float("inf"), float("nan"), [15], True])
def test_a_box_rotation_that_is_not_a_finite_number_is_a_400(client: FlaskClient, rotation: Any) -> None:
    box = _item("rectanglelabels", "box", {"x": 10.0, "y": 10.0, "width": 50.0, "height": 40.0,
                                           "rotation": rotation, "rectanglelabels": ["cat"]})
    body = json.dumps(_predict([box]), allow_nan=True)
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400
    assert "value.rotation must be a number" in response.json["detail"]


@pytest.mark.parametrize(
    "value",
    [
        [None],
        {"brushlabels": 5},
        {"brushlabels": ["cat"], "format": "rle", "rle": "abc"},
        {"brushlabels": ["cat"], "format": "rle", "rle": [1.5, "x", None]},
        {"brushlabels": ["cat"], "format": "rle", "rle": [10**30]},
    ],
)
def test_unreadable_regions_of_the_task_are_skipped_not_a_500(client: FlaskClient, value: Any) -> None:
    body = _predict([_item("keypointlabels", "kp", {"x": 40.0, "y": 50.0, "keypointlabels": ["cat"]})])
    body["tasks"][0]["predictions"] = [{"result": [{"type": "brushlabels", "value": value, "original_width": 32,
                                                    "original_height": 24}]}]
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.json["results"][0]["result"]


@pytest.mark.parametrize(
    "points", [[["a", "b"], [1, 2], [3, 4]], [[1, 2, 3], [4], [5, 6]], [[1e308, 1e308], [-1e308, 0], [0, 1e308]]]
)
def test_unreadable_polygons_of_the_task_are_skipped_not_a_500(client: FlaskClient, points: Any) -> None:
    body = _predict([_item("keypointlabels", "kp", {"x": 40.0, "y": 50.0, "keypointlabels": ["cat"]})])
    body["tasks"][0]["drafts"] = [{"result": [{"type": "polygonlabels", "value": {"points": points,
                                                                                  "polygonlabels": ["cat"]},
                                               "original_width": 32, "original_height": 24}]}]
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.json["results"][0]["result"]


@pytest.mark.parametrize(
    "region",
    [
        {"type": "rectanglelabels", "value": {"x": 1e12, "y": 0, "width": 1e12, "height": 10}},
        {"type": "rectanglelabels", "value": {"x": float("nan"), "y": 0, "width": 10, "height": 10}},
        {"type": "polygonlabels", "value": {"points": [[0, 0], [1e12, 0], [0, 1e12]]}},
        {"type": "polygonlabels", "value": {"points": [[0, 0], [float("inf"), 0], [0, 50]]}},
    ],
)
def test_far_or_non_finite_vertices_are_a_value_error_not_a_crash(region: dict[str, Any]) -> None:
    """pycocotools segfaulted on these (the whole worker died), from an interactive request's
    task predictions or a COCO export of such an annotation."""
    with pytest.raises(ValueError, match="polygon vertices must be finite"):
        decode_region_mask({**region, "original_width": 32, "original_height": 24})


@pytest.mark.parametrize(
    "value",
    [
        [None],
        7,
        {"points": 5},
        {"points": [{"x": 1}, {"x": 2}, {"x": 3}]},
        {"points": [1, 2, 3, 4, 5, 6]},
        {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": [15]},
        {"imageDataURL": data_uri(png_bytes(64, 64))},
    ],
)
@pytest.mark.parametrize("kind", ["brushlabels", "bitmasklabels", "polygonlabels", "rectanglelabels"])
def test_malformed_regions_are_a_value_error(kind: str, value: Any) -> None:
    """The contract every caller relies on (refinement priors, SKIP_EXISTING_MASKS, COCO export):
    these raised AttributeError / TypeError, which the everything pipeline turned into failed tasks."""
    with pytest.raises(ValueError):
        decode_region_mask({"type": kind, "value": value, "original_width": 32, "original_height": 24})
