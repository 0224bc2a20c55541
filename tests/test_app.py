"""The HTTP protocol as Label Studio speaks it (shared/ls-protocol.md), on fake models."""

from __future__ import annotations

import base64
import threading
import time

import pytest
import requests
import torch
from werkzeug.serving import make_server

from backend.config import Settings
from backend.metrics import Metrics
from tests.conftest import CONFIG_ALL_OUTPUTS, data_uri, image_task, wait_for_models
from tests.fakes import BoxDetector, BoxFillSegmenter

CAT_BOX = ((10.0, 20.0, 50.0, 60.0), 0.8)


def _predict_body(tasks: list[dict], config: str = CONFIG_ALL_OUTPUTS, context=None) -> dict:
    return {
        "tasks": tasks,
        "project": "7.1700000000",
        "label_config": config,
        "params": {"login": None, "password": None, "context": context},
    }


def _ready_client(make_client, settings: Settings | None = None):
    client, app = make_client(settings or Settings(), BoxDetector({"cat": [CAT_BOX]}), BoxFillSegmenter())
    wait_for_models(client, 10)
    return client, app


def test_health_answers_at_once_while_models_load(make_client) -> None:
    client, _ = make_client(Settings(), BoxDetector({}), BoxFillSegmenter(), load_delay_s=3)
    started = time.perf_counter()
    response = client.get("/health")
    assert time.perf_counter() - started < 0.5
    assert response.status_code == 200
    assert response.json["status"] == "UP"
    assert response.json["model_state"] == "loading"
    setup = client.post("/setup", json={"project": "1.1", "schema": CONFIG_ALL_OUTPUTS})
    assert setup.status_code == 200 and setup.json["model_version"].startswith("grounded-sam-grounded-")


def test_health_names_the_device_auto_resolved_to_once_ready(make_client) -> None:
    client, _ = make_client(Settings(device="auto"), BoxDetector({}), BoxFillSegmenter(), load_delay_s=0.5)
    assert client.get("/health").json["device"] == "auto"  # still loading: the setting
    wait_for_models(client, 10)
    assert client.get("/health").json["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_predict_waits_then_answers_503_while_loading(make_client) -> None:
    client, _ = make_client(Settings(model_wait_s=0.2), BoxDetector({}), BoxFillSegmenter(), load_delay_s=5)
    response = client.post("/predict", json=_predict_body([image_task(1, 64, 48)]))
    assert response.status_code == 503
    assert "still loading" in response.json["detail"]


def test_model_load_failure_is_reported_everywhere(make_client) -> None:
    from backend.app import create_app

    def broken(settings: Settings, metrics: Metrics):
        raise ValueError("model 'nope/missing' not found; pre-download it or set HF_HOME")

    client = create_app(Settings(model_wait_s=2), broken).test_client()
    health = wait_for_models(client, 5)
    assert health["model_state"] == "error" and "nope/missing" in health["error"]
    setup = client.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS})
    assert setup.status_code == 503 and "nope/missing" in setup.json["detail"]
    predict = client.post("/predict", json=_predict_body([image_task(1, 32, 32)]))
    assert predict.status_code == 503 and "nope/missing" in predict.json["detail"]


@pytest.mark.parametrize(
    ("setting", "model", "hints"),
    [
        # A local folder that is not there: where the error points is the folder itself.
        ("DETECTOR_MODEL", "/nonexistent/gsb-tests/grounding-dino", ("does not exist", "save_pretrained")),
        ("SEGMENTER_MODEL", "/nonexistent/gsb-tests/sam", ("does not exist", "save_pretrained")),
        # A hub id that is not in the cache, offline: pre-download, HF_HOME, offline mode.
        ("DETECTOR_MODEL", "gsb-tests/no-such-detector", ("hf download gsb-tests/no-such-detector", "HF_HOME=",
                                                           "HF_HUB_OFFLINE is set")),
        ("SEGMENTER_MODEL", "gsb-tests/no-such-segmenter", ("hf download gsb-tests/no-such-segmenter", "HF_HOME=",
                                                             "HF_HUB_OFFLINE is set")),
    ],
)
def test_real_model_loading_failure_names_the_model_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path, setting: str, model: str, hints: tuple[str, ...]
) -> None:
    """The default predictor factory (the one ``serve`` uses) on a model that cannot be found:
    the sentence a user reads in /health and /setup is the loader's own, not a test's. The
    detector case pins ``PIPELINE`` because ``auto`` reads the segmenter's config first."""
    from backend.app import create_app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    environ = {setting: model, "PIPELINE": "grounded-sam" if setting == "DETECTOR_MODEL" else "auto",
               "DEVICE": "cpu", "MODEL_WAIT_S": "1"}
    client = create_app(Settings.from_env(environ)).test_client()
    health = wait_for_models(client, 60)
    assert health["model_state"] == "error", health
    role = "detector" if setting == "DETECTOR_MODEL" else "segmenter"
    assert health[role] == model
    setup = client.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS})
    assert setup.status_code == 503
    for message in (health["error"], setup.json["detail"]):
        assert f"{role} config" in message and repr(model) in message
        for hint in hints:
            assert hint in message, (hint, message)
        if "HF_HOME=" in hints:
            assert str(tmp_path / "hf-home") in message


def test_predict_tasks_per_request_histogram_counts_batch_calls_only(make_client) -> None:
    client, _ = _ready_client(make_client)
    tasks = [image_task(1, 32, 32), image_task(2, 48, 32), image_task(3, 32, 48)]
    assert client.post("/predict", json=_predict_body(tasks)).status_code == 200
    assert client.post("/predict", json=_predict_body(tasks[:1])).status_code == 200
    # an interactive call (any context, here one the backend refuses) is not a batch
    assert client.post("/predict", json=_predict_body(tasks[:1], context={})).status_code == 400
    metrics = client.get("/metrics").text
    assert "gsb_predict_tasks_per_request_count 2.0" in metrics
    assert "gsb_predict_tasks_per_request_sum 4.0" in metrics
    assert 'gsb_predict_tasks_per_request_bucket{le="2.0"} 1.0' in metrics
    assert 'gsb_predict_tasks_per_request_bucket{le="3.0"} 2.0' in metrics


def test_setup_version_is_stable_and_follows_thresholds(make_client) -> None:
    client, _ = _ready_client(make_client)
    first = client.post("/setup", json={"project": "3.99", "schema": CONFIG_ALL_OUTPUTS}).json
    again = client.post("/setup", json={"project": "3.99", "schema": CONFIG_ALL_OUTPUTS}).json
    assert first == again
    other, _ = _ready_client(make_client, Settings(box_threshold=0.45))
    changed = other.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS}).json
    assert changed["model_version"] != first["model_version"]
    same_models, _ = _ready_client(make_client, Settings(port=1234, workers=3))
    assert same_models.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS}).json == first


@pytest.mark.parametrize(
    ("schema", "phrase"),
    [
        ('<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="a"/></Labels></View>',
         "no <Image>"),
        ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
         '<Choice value="a"/></Choices></View>', "no <BrushLabels>"),
        ("<View><Image name='image' value='$image'/>", "not valid XML"),
    ],
)
def test_unsupported_config_gets_a_sentence(make_client, schema: str, phrase: str) -> None:
    client, _ = _ready_client(make_client)
    response = client.post("/setup", json={"schema": schema})
    assert response.status_code == 400
    assert phrase in response.json["detail"]
    predict = client.post("/predict", json=_predict_body([image_task(1, 32, 32)], config=schema))
    assert predict.status_code == 400 and phrase in predict.json["detail"]


def test_batch_with_one_broken_image_keeps_order_and_other_results(make_client) -> None:
    client, _ = _ready_client(make_client)
    broken = {"id": 2, "data": {"image": data_uri(b"this is not an image")}}
    tasks = [image_task(1, 640, 480), broken, image_task(3, 480, 640)]
    response = client.post("/predict", json=_predict_body(tasks))
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 3
    assert "result" not in results[1] and "task 2" in results[1]["error"]
    for item, (width, height) in ((results[0], (640, 480)), (results[2], (480, 640))):
        assert item["model_version"].startswith("grounded-sam-grounded-")
        assert {r["type"] for r in item["result"]} == {"brushlabels", "polygonlabels", "rectanglelabels"}
        assert all(r["original_width"] == width and r["original_height"] == height for r in item["result"])
        assert 0 < item["score"] <= 1


def test_regions_carry_label_control_names_and_scores(make_client) -> None:
    client, _ = _ready_client(make_client)
    item = client.post("/predict", json=_predict_body([image_task(1, 100, 80)])).json["results"][0]
    by_type = {r["type"]: r for r in item["result"]}
    assert by_type["brushlabels"]["from_name"] == "brush" and by_type["brushlabels"]["to_name"] == "image"
    assert by_type["brushlabels"]["value"]["brushlabels"] == ["cat"]
    assert by_type["polygonlabels"]["value"]["polygonlabels"] == ["cat"]
    rect = by_type["rectanglelabels"]["value"]
    assert (rect["x"], rect["y"], rect["width"], rect["height"]) == pytest.approx((10.0, 25.0, 40.0, 50.0))
    # detector score 0.8 x segmenter predicted IoU 0.9
    assert by_type["brushlabels"]["score"] == pytest.approx(0.72, abs=1e-3)


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        (b"not json", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b'{"label_config": "<View/>"}', "tasks"),
        (b'{"tasks": []}', "tasks"),
        (b'{"tasks": [{"id": 1}]}', "data"),
    ],
)
def test_malformed_predict_bodies_are_400(make_client, body: bytes, phrase: str) -> None:
    client, _ = _ready_client(make_client)
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400
    assert phrase in response.json["detail"]


def test_webhook_answers_and_counts_actions(make_client) -> None:
    client, app = _ready_client(make_client)
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    assert response.status_code == 200
    assert client.post("/webhook", json={"annotation": {}}).status_code == 400
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'gsb_webhook_events_total{action="ANNOTATION_CREATED"} 1.0' in metrics
    assert "gsb_requests_total" in metrics and "gsb_model_load_seconds" in metrics


def test_basic_auth_protects_everything_but_health(make_client) -> None:
    client, _ = _ready_client(make_client, Settings(basic_auth_user="ls", basic_auth_pass="s3cret"))
    assert client.get("/health").status_code == 200
    denied = client.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS})
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic")
    token = base64.b64encode(b"ls:s3cret").decode()
    allowed = client.post(
        "/setup", json={"schema": CONFIG_ALL_OUTPUTS}, headers={"Authorization": f"Basic {token}"}
    )
    assert allowed.status_code == 200


def test_live_server_on_a_loopback_socket(make_client) -> None:
    _, app = _ready_client(make_client)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert requests.get(f"{base}/health", timeout=5).json()["status"] == "UP"
        response = requests.post(f"{base}/predict", json=_predict_body([image_task(5, 64, 48)]), timeout=30)
        assert response.status_code == 200
        assert response.json()["results"][0]["result"]
    finally:
        server.shutdown()


def test_project_mode_from_setup_extra_params_changes_version_and_is_validated(make_client) -> None:
    client, _ = _ready_client(make_client)
    plain = client.post("/setup", json={"project": "4.1", "schema": CONFIG_ALL_OUTPUTS}).json["model_version"]
    everything = client.post(
        "/setup",
        json={"project": "5.1", "schema": CONFIG_ALL_OUTPUTS, "extra_params": {"prediction_mode": "everything"}},
    )
    assert everything.status_code == 200 and everything.json["model_version"] != plain
    item = client.post("/predict", json={**_predict_body([image_task(1, 64, 48)]), "project": "5.1"}).json
    assert item["results"][0]["model_version"] == everything.json["model_version"]
    bad = client.post(
        "/setup", json={"schema": CONFIG_ALL_OUTPUTS, "extra_params": {"prediction_mode": "psychic"}}
    )
    assert bad.status_code == 400 and "psychic" in bad.json["detail"]


def test_project_mode_from_extra_params_sent_as_text_like_label_studio(make_client) -> None:
    """Label Studio 1.23's connection form keeps extra params as the text the user typed and
    sends it as a JSON *string*; an empty form sends "" or null."""
    client, _ = _ready_client(make_client)
    plain = client.post("/setup", json={"project": "4.1", "schema": CONFIG_ALL_OUTPUTS}).json["model_version"]
    for empty in ("", "  ", None):
        answer = client.post("/setup", json={"project": "4.1", "schema": CONFIG_ALL_OUTPUTS, "extra_params": empty})
        assert answer.status_code == 200 and answer.json["model_version"] == plain
    as_text = client.post(
        "/setup",
        json={"project": "6.1", "schema": CONFIG_ALL_OUTPUTS, "extra_params": '{"prediction_mode": "everything"}'},
    )
    assert as_text.status_code == 200, as_text.json
    assert as_text.json["model_version"].startswith("grounded-sam-everything-")
    item = client.post("/predict", json={**_predict_body([image_task(1, 64, 48)]), "project": "6.1"}).json
    assert item["results"][0]["model_version"] == as_text.json["model_version"]


@pytest.mark.parametrize(
    ("extra_params", "phrases"),
    [
        ("prediction_mode=everything", ["JSON object", "prediction_mode=everything"]),
        ('["everything"]', ["JSON object", "not a JSON array"]),
        ('{"prediction_mode": 5}', ["prediction_mode", "grounded, everything, grounded+everything"]),
        ({"prediction_mode": ["everything"]}, ["prediction_mode", "grounded, everything, grounded+everything"]),
    ],
)
def test_extra_params_that_are_not_a_mode_object_get_a_400_sentence(make_client, extra_params, phrases) -> None:
    client, _ = _ready_client(make_client)
    answer = client.post("/setup", json={"schema": CONFIG_ALL_OUTPUTS, "extra_params": extra_params})
    assert answer.status_code == 400, answer.json
    assert all(phrase in answer.json["detail"] for phrase in phrases), answer.json["detail"]


class _UnnamingDetector(BoxDetector):
    """Reports, like GroundingDINO, boxes it is sure of but could not name."""

    def detect_with_stats(self, image, prompts, box_threshold, text_threshold):
        from backend.models.grounding_dino import DetectionStats

        found = self.detect(image, prompts, box_threshold, text_threshold)
        return found, DetectionStats(forwards=1, above_box_threshold=len(found) + 3, unmatched=3)


def test_boxes_matching_no_label_phrase_are_counted_in_metrics(make_client) -> None:
    client, _ = make_client(Settings(), _UnnamingDetector({"cat": [CAT_BOX]}), BoxFillSegmenter())
    wait_for_models(client, 10)
    response = client.post("/predict", json=_predict_body([image_task(1, 64, 48), image_task(2, 64, 48)]))
    assert response.status_code == 200 and all(item["result"] for item in response.json["results"])
    assert "gsb_unmatched_phrases_total 6.0" in client.get("/metrics").text
