"""Reliability and security through the HTTP app: limits, faults, SSRF, priority, bounds, logs.

Everything goes through ``/predict`` (or the other routes) on fake models, so what is checked
is what Label Studio would see: a per-task ``error`` item or a 4xx with a sentence, never a
500 or a hang. Image servers are ``http.server`` instances on loopback that record every
request; the image loader unit tests (tests/test_images.py) cover the same guards one call
at a time.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
import urllib3.util.connection
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from backend.app import create_app
from backend.config import ConfigError, Settings
from backend.embedding_cache import EmbeddingCache
from backend.gate import ModelGate
from backend.images import ImageLoader
from backend.logs import TEXT_FORMAT, JsonFormatter, configure_logging
from backend.metrics import Metrics
from backend.models.base import Detector, ImageEmbedding, Segmenter
from backend.predictor import Predictor
from tests.conftest import CONFIG_ALL_OUTPUTS, data_uri, image_task, png_bytes
from tests.fakes import BoxDetector, BoxFillSegmenter

CAT_BOX = ((4.0, 4.0, 20.0, 16.0), 0.8)
LS_KEY = "0123456789abcdef0123456789abcdef01234567"
MIB = 1024 * 1024

KEYPOINT_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>
"""


# ---------------------------------------------------------------------------- helpers


def ready_app(
    settings: Settings | None = None, detector: Detector | None = None, segmenter: Segmenter | None = None
) -> tuple[FlaskClient, Flask, Predictor]:
    """An app on fake models, loaded; the image loader retries after 10 ms instead of 0.5 s."""

    def load(s: Settings, metrics: Metrics) -> Predictor:
        cache = EmbeddingCache(max_bytes=s.embedding_cache_mb * MIB)
        return Predictor(
            s,
            detector or BoxDetector({"cat": [CAT_BOX]}),
            segmenter or BoxFillSegmenter(),
            cache,
            ImageLoader(s, backoff_s=0.01),
            metrics,
        )

    app = create_app(settings or Settings(), load)
    predictor = app.extensions["backend_state"].runtime.get(10)
    return app.test_client(), app, predictor


def predict_body(tasks: list[dict], config: str = CONFIG_ALL_OUTPUTS, context: dict | None = None) -> dict:
    return {"tasks": tasks, "project": "7.1", "label_config": config, "params": {"context": context}}


def url_task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}}


def click(x: float, y: float) -> dict:
    return {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                        "value": {"x": x, "y": y, "width": 0.3, "keypointlabels": ["cat"]}}]}


def error_counts(client: FlaskClient) -> dict[str, float]:
    """``gsb_errors_total`` by kind; authenticates as ``u:p`` (ignored where auth is off)."""
    text = client.get("/metrics", auth=("u", "p")).get_data(as_text=True)
    return {kind: float(v) for kind, v in re.findall(r'^gsb_errors_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


Respond = Callable[[BaseHTTPRequestHandler], None]


class _Recorder(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        try:
            self.server.respond(self)  # type: ignore[attr-defined]
        except OSError:  # the client gave up (timeouts): nothing to answer
            pass

    def log_message(self, *args: object) -> None:
        pass


class _Recorder6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextmanager
def loopback(respond: Respond, host: str = "127.0.0.1", port: int = 0) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on ``host`` (a loopback address) that records every path it is asked for."""
    server = (_Recorder6 if ":" in host else ThreadingHTTPServer)((host, port), _Recorder)
    server.hits = []  # type: ignore[attr-defined]
    server.respond = respond  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{server.server_address[1]}", server.hits  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def send_png(handler: BaseHTTPRequestHandler) -> None:
    payload = png_bytes(40, 30)
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def redirect_to(location: str) -> Respond:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


@pytest.fixture
def wiretap(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connection the image loader opens, recorded. Loopback ones go through; any other
    is refused here, so a guard that failed shows up in the list and nothing leaves the host."""
    real = urllib3.util.connection.create_connection
    opened: list[tuple[str, int]] = []

    def create_connection(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        opened.append((address[0], address[1]))
        if address[0] not in ("127.0.0.1", "::1"):
            raise ConnectionRefusedError(f"test wiretap: {address[0]} is not loopback")
        return real(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
    return opened


def fake_dns(monkeypatch: pytest.MonkeyPatch, mapping: dict[str, str]) -> None:
    """Resolve the given names to the given IPv4 addresses; everything else as usual."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host in mapping:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (mapping[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# ---------------------------------------------------------------------------- limits


def test_too_many_tasks_is_413_with_the_limit_named() -> None:
    client, _, _ = ready_app(Settings(max_tasks_per_request=3))
    tasks = [image_task(i, 24, 16) for i in range(4)]
    refused = client.post("/predict", json=predict_body(tasks))
    assert refused.status_code == 413
    assert "4 tasks" in refused.json["detail"] and "MAX_TASKS_PER_REQUEST=3" in refused.json["detail"]
    accepted = client.post("/predict", json=predict_body(tasks[:3]))
    assert accepted.status_code == 200 and len(accepted.json["results"]) == 3


def test_body_over_max_request_mb_is_a_json_413() -> None:
    client, _, _ = ready_app(Settings(max_request_mb=1))
    body = json.dumps(predict_body([image_task(1, 24, 16)]) | {"padding": "x" * (2 * MIB)})
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.json["status"] == 413 and response.json["detail"]


def test_chunked_body_over_max_request_mb_is_a_json_413_naming_the_limit() -> None:
    # No Content-Length to refuse up front: werkzeug's stream stops at the limit without a word,
    # which used to read as truncated JSON ("must be a JSON object").
    client, _, _ = ready_app(Settings(max_request_mb=1))
    chunked = {"headers": {"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
               "environ_overrides": {"wsgi.input_terminated": True}}  # as gunicorn serves chunked bodies
    body = json.dumps(predict_body([image_task(1, 24, 16)]) | {"padding": "x" * (2 * MIB)}).encode()
    response = client.post("/predict", input_stream=io.BytesIO(body), **chunked)
    assert response.status_code == 413
    assert "MAX_REQUEST_MB=1" in response.json["detail"] and response.json["status"] == 413
    small = json.dumps(predict_body([image_task(1, 24, 16)])).encode()
    accepted = client.post("/predict", input_stream=io.BytesIO(small), **chunked)
    assert accepted.status_code == 200 and accepted.json["results"][0]["result"]


def test_decompression_bombs_and_oversized_images_are_per_task_errors() -> None:
    client, _, _ = ready_app(Settings(max_image_pixels=1_000_000, max_image_bytes=200_000))
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, "PNG")  # ~9 MB of pixels in a few KB of PNG
    bomb = buffer.getvalue()
    noise = png_bytes(400, 300)  # random pixels: a PNG of ~360 KB
    assert len(bomb) < 200_000 < len(noise)
    tasks = [{"id": 1, "data": {"image": data_uri(bomb)}}, {"id": 2, "data": {"image": data_uri(noise)}},
             image_task(3, 64, 48)]
    results = client.post("/predict", json=predict_body(tasks)).json["results"]
    assert "9000000 pixels, over MAX_IMAGE_PIXELS=1000000" in results[0]["error"]
    assert "over MAX_IMAGE_BYTES=200000" in results[1]["error"]
    assert results[2]["result"]


def test_stalled_and_trickling_downloads_end_as_per_task_errors_within_the_timeout() -> None:
    stop = threading.Event()

    def stall(handler: BaseHTTPRequestHandler) -> None:
        stop.wait(10)  # accept, then never answer

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        for _ in range(100):  # one byte at a time for 5 s at most: no single read times out
            if stop.wait(0.05):
                return
            handler.wfile.write(b"x")
            handler.wfile.flush()

    client, _, _ = ready_app(Settings(download_timeout_s=0.3, allowed_image_hosts="127.0.0.1"))
    with loopback(stall) as (stalled, stalled_hits), loopback(trickle) as (trickling, _):
        try:
            started = time.perf_counter()
            tasks = [url_task(1, f"{stalled}/a.png"), url_task(2, f"{trickling}/b.png"), image_task(3, 32, 24)]
            results = client.post("/predict", json=predict_body(tasks)).json["results"]
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
    assert "no complete response within DOWNLOAD_TIMEOUT_S=0.3" in results[0]["error"]
    assert "gave up after 3 tries" in results[0]["error"]
    assert len(stalled_hits) == 3
    assert "took longer than DOWNLOAD_TIMEOUT_S=0.3" in results[1]["error"]
    assert results[2]["result"]
    # three 0.3 s tries on the stalled server, one 0.3 s body deadline on the other, then slack
    assert elapsed < 3.0


def test_a_stalled_image_ends_at_the_request_budget_and_later_tasks_are_deferred() -> None:
    """PREDICT_TIME_BUDGET_S bounds the whole request, not only the start of each task: without
    it the stalled image takes 3 tries x DOWNLOAD_TIMEOUT_S=3 s, past the 1 s budget."""
    stop = threading.Event()

    def stall(handler: BaseHTTPRequestHandler) -> None:
        stop.wait(10)  # accept, then never answer

    client, _, _ = ready_app(
        Settings(predict_time_budget_s=1.0, download_timeout_s=3.0, allowed_image_hosts="127.0.0.1")
    )
    with loopback(stall) as (stalled, hits):
        try:
            started = time.perf_counter()
            batch = [url_task(1, f"{stalled}/a.png"), image_task(2, 32, 24), image_task(3, 32, 24)]
            results = client.post("/predict", json=predict_body(batch)).json["results"]
            batch_s = time.perf_counter() - started
            started = time.perf_counter()
            answer = client.post("/predict", json=predict_body([url_task(4, f"{stalled}/b.png")], KEYPOINT_CONFIG,
                                                               click(50.0, 50.0)))
            click_s = time.perf_counter() - started
        finally:
            stop.set()
    assert "not downloaded within the request's time budget (PREDICT_TIME_BUDGET_S=1)" in results[0]["error"]
    assert "no complete response within DOWNLOAD_TIMEOUT_S=3" in results[0]["error"]
    assert [item.get("deferred") for item in results[1:]] == [True, True]  # not started in time: deferred
    assert answer.status_code == 200
    assert "time budget (PREDICT_TIME_BUDGET_S=1)" in answer.json["results"][0]["error"]  # clicks too
    assert len(hits) == 2  # one cut attempt per image, no retries past the budget
    assert batch_s < 2.5 and click_s < 2.5, (batch_s, click_s)


# ---------------------------------------------------------------------------- faults


def test_label_studio_unreachable_is_a_per_task_error_and_the_next_request_retries() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connections are refused
    client, _, _ = ready_app(Settings(label_studio_url=f"http://127.0.0.1:{port}", label_studio_api_key=LS_KEY))
    body = predict_body([url_task(1, "/data/upload/1/cat.png"), image_task(2, 32, 24)])

    first = client.post("/predict", json=body).json["results"]
    assert "cannot connect" in first[0]["error"] and "gave up after 3 tries" in first[0]["error"]
    assert first[1]["result"]
    assert error_counts(client)["image"] == 1

    with loopback(send_png, port=port) as (_, hits):
        second = client.post("/predict", json=body).json["results"]
    assert second[0]["result"] and second[0]["result"][0]["original_width"] == 40
    assert hits == ["/storage-data/uploaded/?filepath=upload/1/cat.png"]


# ---------------------------------------------------------------------------- SSRF


def test_private_targets_are_refused_per_task_and_never_contacted(monkeypatch, wiretap) -> None:
    fake_dns(monkeypatch, {"intranet.example": "10.1.2.3", "images.example": "127.0.0.1"})
    with (
        loopback(send_png) as (secret, secret_hits),
        loopback(send_png, host="::1") as (secret6, secret6_hits),
        loopback(redirect_to(f"{secret}/secret")) as (allowed, allowed_hits),
    ):
        allowed_port = urlsplit(allowed).port
        client, _, _ = ready_app(Settings(allowed_image_hosts="images.example"))
        tasks = [
            url_task(1, f"{secret}/secret"),
            url_task(2, "http://169.254.169.254/latest/meta-data/"),
            url_task(3, f"{secret6}/secret"),
            url_task(4, "http://intranet.example/secret"),
            url_task(5, f"http://images.example:{allowed_port}/cat.png"),
            image_task(6, 32, 24),
        ]
        response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200
    results = response.json["results"]
    reasons = ["127.0.0.1 (not public: loopback)", "169.254.169.254 (cloud metadata address)",
               "::1 (not public: loopback)", "10.1.2.3 (not public: private)", "127.0.0.1 (not public: loopback)"]
    for item, reason in zip(results[:5], reasons, strict=True):
        assert "result" not in item and "refused to fetch" in item["error"] and reason in item["error"], item
    assert "/secret" in results[4]["error"]  # the redirect's target, not the allowed first hop
    assert results[5]["result"]
    assert secret_hits == [] and secret6_hits == []
    assert allowed_hits == ["/cat.png"]
    assert wiretap == [("127.0.0.1", allowed_port)]
    assert error_counts(client)["image"] == 5


def test_a_setup_hostname_opens_no_private_address(wiretap) -> None:
    # Without LABEL_STUDIO_URL, anyone reaching the backend could name a loopback "Label Studio"
    # in /setup and have the backend fetch internal URLs for them.
    with loopback(send_png) as (internal, internal_hits):
        client, _, _ = ready_app(Settings())
        setup = {"project": "7.1", "schema": CONFIG_ALL_OUTPUTS, "hostname": internal, "access_token": LS_KEY}
        assert client.post("/setup", json=setup).status_code == 200
        tasks = [url_task(1, f"{internal}/secret"), url_task(2, "/data/upload/1/cat.png"), image_task(3, 32, 24)]
        results = client.post("/predict", json=predict_body(tasks)).json["results"]
        for item in results[:2]:
            assert "result" not in item and "127.0.0.1 (not public: loopback)" in item["error"], item
        assert "set LABEL_STUDIO_URL to this Label Studio or add 127.0.0.1 to ALLOWED_IMAGE_HOSTS" in (
            results[0]["error"]
        )
        assert results[2]["result"]
        assert internal_hits == [] and wiretap == []

        # configured by the operator, the same loopback Label Studio is fetched from
        client, _, _ = ready_app(Settings(label_studio_url=internal))
        assert client.post("/setup", json=setup).status_code == 200
        served = client.post("/predict", json=predict_body([url_task(2, "/data/upload/1/cat.png")])).json
    assert served["results"][0]["result"]
    assert internal_hits == ["/storage-data/uploaded/?filepath=upload/1/cat.png"]


# ---------------------------------------------------------------------------- interactive priority


class FifoLock:
    """A ticket lock: granted in arrival order, the fairest a model lock could be."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class SerialSegmenter(BoxFillSegmenter):
    """``BoxFillSegmenter`` behind one lock per model, as the real adapters are; records the
    width of every image it embeds, in order."""

    def __init__(self, embed_delay_s: float) -> None:
        super().__init__(embed_delay_s=embed_delay_s)
        self.lock = FifoLock()
        self.embedded: list[int] = []

    def embed(self, image: Image.Image) -> ImageEmbedding:
        with self.lock:
            self.embedded.append(image.width)
            return super().embed(image)

    def segment(self, embedding, prompts, multimask=False):  # noqa: ANN001, ANN201 - the base's signature
        with self.lock:
            return super().segment(embedding, prompts, multimask)


def test_a_click_during_batches_waits_for_one_batch_task_not_for_the_queue() -> None:
    """Two batch requests and a click compete for one segmenter. Even with a perfectly fair
    (FIFO) model lock, the click would queue behind the other batch's waiting task; the gate
    lets it go right after the task that is running."""
    segmenter = SerialSegmenter(embed_delay_s=0.25)
    client, app, _ = ready_app(segmenter=segmenter)
    done: dict[str, float] = {}
    responses: dict[str, int] = {}

    def post(name: str, body: dict) -> None:
        response = app.test_client().post("/predict", json=body)
        responses[name] = response.status_code
        done[name] = time.perf_counter()

    batch_a = [image_task(i, 100 + i, 80) for i in range(3)]
    batch_b = [image_task(10 + i, 110 + i, 80) for i in range(3)]
    clicked = {"id": 99, "data": {"image": data_uri(png_bytes(200, 80))}}
    threads = [threading.Thread(target=post, args=("a", predict_body(batch_a)))]
    threads[0].start()
    deadline = time.time() + 5
    while not segmenter.embedded and time.time() < deadline:  # batch A's first task holds the model
        time.sleep(0.005)
    threads.append(threading.Thread(target=post, args=("b", predict_body(batch_b))))
    threads[1].start()
    time.sleep(0.05)  # batch B's first task is queued
    started = time.perf_counter()
    click_body = predict_body([clicked], KEYPOINT_CONFIG, click(50, 50))
    threads.append(threading.Thread(target=post, args=("click", click_body)))
    threads[2].start()
    for thread in threads:
        thread.join(30)
    assert responses == {"a": 200, "b": 200, "click": 200}
    assert segmenter.embedded.index(200) == 1, segmenter.embedded  # right after the running task
    assert done["click"] < min(done["a"], done["b"])
    assert done["click"] - started < 3 * 0.25  # the running task's rest + its own embedding


def test_gate_lets_batch_tasks_through_a_steady_stream_of_clicks_and_clicks_between_them() -> None:
    """Two batch requests whose tasks take longer than the yield bound, under constant clicks:
    each batch task goes in after yielding ``max_yield_s``, and clicks are served between any
    two batch tasks (the second batch request does not go straight after the first)."""
    gate = ModelGate(max_yield_s=0.2)
    stop = threading.Event()
    entries: list[tuple[float, int]] = []  # (seconds since start, clicks done by then)
    overlap: list[str] = []
    inside = {"interactive": 0, "batch": 0, "clicks_done": 0}
    lock = threading.Lock()

    @contextmanager
    def occupying(kind: str, other: str) -> Iterator[None]:
        """``kind`` holds the model for the block; finding ``other`` inside is an overlap."""
        with lock:
            inside[kind] += 1
            if inside[other]:
                overlap.append(f"{kind} during {other}")
        yield
        with lock:
            inside[kind] -= 1

    def clicks() -> None:
        while not stop.is_set():
            with gate.interactive():
                with occupying("interactive", "batch"):
                    time.sleep(0.03)
                with lock:
                    inside["clicks_done"] += 1

    def batch() -> None:
        for _ in range(2):
            with gate.batch_task():
                with lock:
                    entries.append((time.monotonic() - started, inside["clicks_done"]))
                with occupying("batch", "interactive"):
                    time.sleep(0.3)

    annotators = [threading.Thread(target=clicks) for _ in range(3)]
    for i, thread in enumerate(annotators):
        thread.start()
        time.sleep(0.01 * i)  # staggered: at every moment some click waits or runs
    started = time.monotonic()
    batches = [threading.Thread(target=batch) for _ in range(2)]
    for thread in batches:
        thread.start()
    for thread in batches:
        thread.join(10)
    stop.set()
    for thread in annotators:
        thread.join(5)
    assert overlap == []
    assert len(entries) == 4
    assert 0.15 < entries[0][0] < 1.0  # yielded for max_yield_s, then went in while clicks went on
    for (before, clicks_before), (after, clicks_after) in zip(entries, entries[1:], strict=False):
        assert after - before > 0.3 + 0.15  # the task, then a window for clicks
        assert clicks_after > clicks_before


def test_gate_never_overlaps_batch_tasks_with_each_other_or_with_clicks() -> None:
    gate = ModelGate(max_yield_s=0.05)
    inside = {"interactive": 0, "batch": 0}
    violations: list[dict[str, int]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            kind = rng.choice(["interactive", "batch"])
            with gate.interactive() if kind == "interactive" else gate.batch_task():
                with lock:
                    inside[kind] += 1
                    if inside["batch"] > 1 or (inside["batch"] and inside["interactive"]):
                        violations.append(dict(inside))
                time.sleep(rng.random() * 0.002)
                with lock:
                    inside[kind] -= 1

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert violations == []
    assert gate.snapshot() == {"interactive": 0, "batch_running": 0}


# ---------------------------------------------------------------------------- memory bounds


class BulkySegmenter(BoxFillSegmenter):
    """Embeddings of just over 256 KiB, so a 1 MiB cache holds three."""

    def embed(self, image: Image.Image) -> ImageEmbedding:
        embedding = super().embed(image)
        embedding.tensors["features"] = np.zeros(64 * 1024, np.float32)
        return embedding


def test_embedding_cache_stays_within_its_budget_under_concurrent_clicks() -> None:
    client, app, predictor = ready_app(Settings(embedding_cache_mb=1), segmenter=BulkySegmenter())
    peak = {"bytes": 0, "entries": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            stats = predictor.cache.stats()
            peak["bytes"] = max(peak["bytes"], stats["bytes"])
            peak["entries"] = max(peak["entries"], stats["entries"])
            time.sleep(0.001)

    statuses: list[int] = []

    def annotator(offset: int) -> None:
        for i in range(4):
            task = {"id": offset * 10 + i, "data": {"image": data_uri(png_bytes(40 + offset * 4 + i, 30))}}
            response = app.test_client().post("/predict", json=predict_body([task], KEYPOINT_CONFIG, click(50, 50)))
            statuses.append(response.status_code)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=annotator, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stop.set()
    sampler.join()
    stats = predictor.cache.stats()
    assert statuses == [200] * 24
    assert stats["computes"] == 24 and stats["evictions"] == 24 - stats["entries"]
    assert peak["bytes"] <= MIB and peak["entries"] <= 3
    exported = client.get("/metrics").get_data(as_text=True)
    assert f'gsb_embedding_cache{{stat="bytes"}} {float(stats["bytes"])}' in exported


def test_per_project_setup_state_is_bounded() -> None:
    client, app, _ = ready_app()
    state = app.extensions["backend_state"]
    state.max_projects = 5
    for project in range(12):
        assert client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG_ALL_OUTPUTS}).status_code == 200
    assert list(state.setups) == [str(p) for p in range(7, 12)]
    forgotten = client.post("/predict", json={"tasks": [image_task(1, 24, 16)], "project": "1.1"})
    assert forgotten.status_code == 400 and "/setup was not called" in forgotten.json["detail"]


def test_webhook_actions_do_not_grow_the_metrics_registry() -> None:
    client, _, _ = ready_app()
    for i in range(30):
        assert client.post("/webhook", json={"action": f"MADE_UP_{i}"}).status_code == 200
    assert client.post("/webhook", json={"action": "ANNOTATION_UPDATED"}).status_code == 200
    too_long = client.post("/webhook", json={"action": "A" * 129})
    assert too_long.status_code == 400 and "action" in too_long.json["detail"]
    exported = client.get("/metrics").get_data(as_text=True)
    labels = re.findall(r'^gsb_webhook_events_total\{action="([^"]*)"\} (\S+)$', exported, re.M)
    assert sorted(labels) == [("ANNOTATION_UPDATED", "1.0"), ("other", "30.0")]


# ---------------------------------------------------------------------------- errors by kind


class ExplodingDetector(BoxDetector):
    def detect(self, *args: object, **kwargs: object) -> list:
        raise RuntimeError("detector exploded")


class ExplodingSegmenter(BoxFillSegmenter):
    def embed(self, image: Image.Image) -> ImageEmbedding:
        raise RuntimeError("segmenter exploded")


def _bad_auth(client: FlaskClient) -> int:
    return client.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS}).status_code


def _one_click(client: FlaskClient) -> int:
    body = predict_body([image_task(1, 32, 24)], KEYPOINT_CONFIG, click(50, 50))
    return client.post("/predict", json=body).status_code


ERROR_CASES: list[tuple[str, dict, Callable[[FlaskClient], int], int, str]] = [
    ("not JSON", {}, lambda c: c.post("/predict", data=b"nope", content_type="application/json").status_code,
     400, "request"),
    ("nested too deeply", {}, lambda c: c.post("/webhook", data=b"[" * 100_000,
                                               content_type="application/json").status_code, 400, "request"),
    ("unknown route", {}, lambda c: c.get("/nope").status_code, 404, "request"),
    ("wrong method", {}, lambda c: c.get("/predict").status_code, 405, "request"),
    ("body too large", {"settings": Settings(max_request_mb=1)},
     lambda c: c.post("/webhook", data=b"x" * (2 * MIB), content_type="application/json").status_code, 413, "request"),
    ("too many tasks", {"settings": Settings(max_tasks_per_request=1)},
     lambda c: c.post("/predict", json=predict_body([{"data": {}}, {"data": {}}])).status_code, 413, "request"),
    ("bad credentials", {"settings": Settings(basic_auth_user="u", basic_auth_pass="p")}, _bad_auth, 401, "auth"),
    ("unsupported config", {}, lambda c: c.post("/setup", json={"schema": "<View/>"}).status_code, 400, "config"),
    ("unusable click", {}, lambda c: c.post("/predict", json=predict_body(
        [image_task(1, 32, 24)], KEYPOINT_CONFIG, {"result": [{"type": "keypointlabels", "value": {"x": "left"}}]}
    )).status_code, 400, "request"),
    ("image unreachable", {}, lambda c: c.post("/predict", json=predict_body(
        [url_task(1, "/data/upload/1/x.png")])).status_code, 200, "image"),
    ("detector crashes on a task", {"detector": ExplodingDetector({})},
     lambda c: c.post("/predict", json=predict_body([image_task(1, 32, 24)])).status_code, 200, "internal"),
    ("segmenter crashes on a click", {"segmenter": ExplodingSegmenter()}, _one_click, 200, "internal"),
]


@pytest.mark.parametrize(("name", "app_args", "act", "status", "kind"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_every_error_path_counts_exactly_one_kind(name, app_args, act, status: int, kind: str) -> None:
    client, _, _ = ready_app(**app_args)
    before = error_counts(client)
    assert act(client) == status
    after = error_counts(client)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    assert delta == {kind: 1.0}


@pytest.mark.parametrize("context", [click(50, 50), {"event": "prewarm"}], ids=["click", "prewarm"])
def test_a_model_failing_on_an_interactive_request_is_an_error_item_as_in_batch(context: dict) -> None:
    client, _, _ = ready_app(segmenter=ExplodingSegmenter())
    response = client.post("/predict", json=predict_body([image_task(1, 32, 24)], KEYPOINT_CONFIG, context))
    assert response.status_code == 200
    [item] = response.json["results"]
    assert "result" not in item and item["model_version"]
    assert item["error"] == "task 1: RuntimeError: segmenter exploded"
    batch = client.post("/predict", json=predict_body([image_task(1, 32, 24)], KEYPOINT_CONFIG)).json["results"]
    assert batch[0]["error"].startswith("task 1: RuntimeError: segmenter exploded")


def test_model_load_failure_counts_as_a_model_error() -> None:
    def broken(settings: Settings, metrics: Metrics) -> Predictor:
        raise OSError("weights missing")

    app = create_app(Settings(model_wait_s=5), broken)
    client = app.test_client()
    response = client.post("/predict", json=predict_body([image_task(1, 32, 24)]))
    assert response.status_code == 503 and "weights missing" in response.json["detail"]
    assert error_counts(client) == {"model": 1.0}


# ---------------------------------------------------------------------------- logs


def test_log_records_carry_the_request_id_and_task_ids(caplog: pytest.LogCaptureFixture) -> None:
    client, _, _ = ready_app()
    tasks = [image_task(i, 24, 16) for i in range(1, 12)] + [url_task(12, "/data/upload/none.png")]
    with caplog.at_level(logging.INFO):
        response = client.post("/predict", json=predict_body(tasks), headers={"X-Request-ID": "ls-4711"})
        logging.getLogger("backend.test").info("outside a request")
    assert response.headers["X-Request-ID"] == "ls-4711"
    [record] = [r for r in caplog.records if r.getMessage().startswith("task 12:")]
    assert record.request_id == "ls-4711"
    assert record.task_ids == "1,2,3,4,5,6,7,8,9,10,... (+2)"
    assert "[req ls-4711 tasks 1,2,3,4,5,6,7,8,9,10,... (+2)] task 12:" in logging.Formatter(TEXT_FORMAT).format(record)
    as_json = json.loads(JsonFormatter().format(record))
    assert as_json["request_id"] == "ls-4711" and as_json["level"] == "WARNING"
    assert as_json["message"].startswith("task 12:")
    outside = caplog.records[-1]
    assert outside.getMessage() == "outside a request" and outside.request_id == "-" and outside.task_ids == ""


def test_a_request_id_that_is_not_an_id_is_replaced() -> None:
    client, _, _ = ready_app()
    for header in ("x" * 65, "two words", "a/b"):
        echoed = client.get("/health", headers={"X-Request-ID": header}).headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{12}", echoed), header


def test_unknown_log_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LOG_FORMAT='xml'"):
        configure_logging("INFO", "xml")
