"""Load on the real server: 50 concurrent interactive clients on loopback, then clicks during batches.

    .venv/bin/python -m bench.load [--clients 50] [--seconds 30] [--segmenter tiny|vit-b]

Starts ``grounded-sam-backend serve`` (gunicorn, gthread, one worker) as a subprocess on
127.0.0.1 with random-weight models built on the spot: the tiny GroundingDINO and SAM of the
tests, or with ``--segmenter vit-b`` a SAM of the real ViT-B size (``SamConfig()``). Task
images live on a loopback "Label Studio" (``LABEL_STUDIO_URL``) as ``/data/upload/...`` paths,
so every request goes through the download path, its cache, the embedding cache and the
encoder, as in production. Nothing leaves the host.

Phase ``interactive``: ``--clients`` annotators, each clicking on one of ``--images`` tasks
(several annotators share a task, so the embedding cache's single flight is exercised) as
fast as answers come, for ``--seconds``. Phase ``clicks_alone``: ``--batch-clickers``
annotators for ``--batch-seconds``, and phase ``batch_alone``: one client posting 4-task
pre-annotation batches of new images without pause, the baselines of the last phase,
``clicks_during_batch``: both at once; the gate (backend/gate.py) should keep the click latency near the baseline
plus at most one batch task, while batches still progress (``INTERACTIVE_PRIORITY_S``).
Every loop stops on its own.

Reported: request count, status counts (the run fails on any 5xx or transport error),
latency p50/p95/p99/max per phase, the worker's resident memory at the start and end of
each phase and its peak (VmHWM), the embedding cache's bytes, and ``gsb_errors_total``. Written
to bench/results/load.json with the CPU description (timings from other CPUs do not compare).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from backend.models.loading import describe_cpu

RESULTS = Path(__file__).parent / "results" / "load.json"
API_KEY = "0123456789abcdef0123456789abcdef01234567"
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="red car"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
</View>
"""


# ---------------------------------------------------------------------------- models and images


def build_models(root: Path, segmenter: str) -> tuple[Path, Path]:
    """Random-weight detector and segmenter folders, loadable by the production loaders."""
    from tests.tiny_models import build_tiny_grounding_dino
    from tests.tiny_sam_models import build_tiny_sam

    detector = build_tiny_grounding_dino(root / "gdino")
    if segmenter == "tiny":
        return detector, build_tiny_sam(root / "sam")
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    folder = root / "sam-vit-b"
    SamModel(SamConfig()).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)
    return detector, folder


def png(seed: int, width: int = 320, height: int = 240) -> bytes:
    """Flat shapes on noise: something for the models to chew on, distinct per seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width - 60), rng.integers(0, height - 60)
        pixels[y : y + rng.integers(20, 60), x : x + rng.integers(20, 60)] = rng.integers(80, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class _ImageHandler(BaseHTTPRequestHandler):
    """Label Studio's upload paths: ``/storage-data/uploaded/?filepath=upload/1/<seed>.png``."""

    def do_GET(self) -> None:
        match = re.search(r"upload/1/(\d+)\.png", self.path)
        if match is None or self.headers.get("Authorization") != f"Token {API_KEY}":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = png(int(match.group(1)))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


# ---------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_mb(pid: int) -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def start_server(env: dict[str, str], port: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    """``grounded-sam-backend serve`` on loopback; returns the process and its worker's pid."""
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see {log_path}")
        try:
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        except requests.RequestException:
            health = {}
        if health.get("model_state") == "error":
            raise RuntimeError(f"models failed to load: {health.get('error')}")
        if health.get("model_state") == "ready" and children(server.pid):
            return server, children(server.pid)[0]
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready in 600 s")


# ---------------------------------------------------------------------------- load loops


class Recorder:
    """Latencies and outcomes of one phase, shared by its client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []

    def add(self, kind: str, seconds: float, status: int | str, detail: str = "") -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)
            self.statuses[f"{kind}:{status}"] += 1
            if not isinstance(status, int) or status >= 500 or detail:
                self.failures.append(f"{kind}: {status} {detail}"[:300])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"statuses": dict(self.statuses), "failures": self.failures[:20]}
        for kind, values in self.latencies.items():
            ms = np.array(values) * 1000
            out[kind] = {
                "requests": len(values),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p95_ms": round(float(np.percentile(ms, 95)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1),
                "max_ms": round(float(ms.max()), 1),
            }
        return out


def click_body(task_id: int, rng: random.Random) -> dict[str, Any]:
    point = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 320,
             "original_height": 240, "image_rotation": 0, "is_positive": True,
             "value": {"x": rng.uniform(5, 95), "y": rng.uniform(5, 95), "width": 0.3, "keypointlabels": ["cat"]}}
    task = {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}, "annotations": [], "drafts": []}
    return {"tasks": [task], "project": "1.1", "label_config": CONFIG, "params": {"context": {"result": [point]}}}


def batch_body(first_id: int, count: int) -> dict[str, Any]:
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(first_id, first_id + count)]
    return {"tasks": tasks, "project": "1.1", "label_config": CONFIG, "params": {"context": None}}


def post(session: requests.Session, url: str, body: dict, recorder: Recorder, kind: str) -> None:
    started = time.perf_counter()
    try:
        response = session.post(url, json=body, timeout=120)
    except requests.RequestException as exc:
        recorder.add(kind, time.perf_counter() - started, type(exc).__name__, str(exc))
        return
    elapsed = time.perf_counter() - started
    detail = ""
    if response.status_code == 200:
        errors = [item["error"] for item in response.json()["results"] if "error" in item]
        detail = "; ".join(errors)
    recorder.add(kind, elapsed, response.status_code, detail)


def run_phase(
    loops: list[Callable[[float], None]], seconds: float, worker_pid: int
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Run every loop in its own thread until ``seconds`` pass; memory before and after."""
    before = memory_mb(worker_pid)
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=loop, args=(deadline,)) for loop in loops]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, before, memory_mb(worker_pid)


def metric_lines(base: str, prefix: str) -> dict[str, float]:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^({prefix}\S*) (\S+)$", text, re.M)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--images", type=int, default=10, help="distinct tasks the interactive clients share")
    parser.add_argument("--batch-clickers", type=int, default=10)
    parser.add_argument("--batch-seconds", type=float, default=15.0)
    parser.add_argument("--segmenter", choices=["tiny", "vit-b"], default="tiny")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads of the one worker")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gsb-load-") as tmp:
        root = Path(tmp)
        built = time.perf_counter()
        detector, segmenter = build_models(root, args.segmenter)
        images = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
        threading.Thread(target=images.serve_forever, daemon=True).start()
        port = free_port()
        env = {
            "DETECTOR_MODEL": str(detector), "SEGMENTER_MODEL": str(segmenter), "DEVICE": "cpu", "DTYPE": "float32",
            "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "4", "THREADS": str(args.threads),
            "LABEL_STUDIO_URL": f"http://127.0.0.1:{images.server_address[1]}", "LABEL_STUDIO_API_KEY": API_KEY,
            "LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        server, worker = start_server(env, port, root / "server.log")
        base = f"http://127.0.0.1:{port}"
        print(f"server ready in {time.perf_counter() - built:.1f} s (worker pid {worker})", flush=True)
        try:
            # warm-up: one click per shared image, so phase 1 measures a working day, not start-up
            warm = Recorder()
            with requests.Session() as session:
                for task_id in range(args.images):
                    post(session, f"{base}/predict", click_body(task_id, random.Random(task_id)), warm, "warmup")

            interactive = Recorder()

            def annotator(index: int) -> Callable[[float], None]:
                def loop(deadline: float) -> None:
                    rng = random.Random(index)
                    with requests.Session() as session:
                        while time.monotonic() < deadline:
                            post(session, f"{base}/predict", click_body(index % args.images, rng), interactive, "click")

                return loop

            elapsed1, before1, after1 = run_phase(
                [annotator(i) for i in range(args.clients)], args.seconds, worker
            )
            print(f"interactive: {json.dumps(interactive.summary().get('click'))}", flush=True)

            alone = Recorder()
            batch_alone = Recorder()
            mixed = Recorder()
            next_batch_id = [1000]

            def batcher(recorder: Recorder) -> Callable[[float], None]:
                def loop(deadline: float) -> None:
                    with requests.Session() as session:
                        while time.monotonic() < deadline:
                            first, next_batch_id[0] = next_batch_id[0], next_batch_id[0] + 4
                            post(session, f"{base}/predict", batch_body(first, 4), recorder, "batch")

                return loop

            def clicker(index: int, recorder: Recorder) -> Callable[[float], None]:
                def loop(deadline: float) -> None:
                    rng = random.Random(1000 + index)
                    with requests.Session() as session:
                        while time.monotonic() < deadline:
                            post(session, f"{base}/predict", click_body(index % args.images, rng), recorder, "click")

                return loop

            elapsed_alone, _, _ = run_phase(
                [clicker(i, alone) for i in range(args.batch_clickers)], args.batch_seconds, worker
            )
            print(f"clicks alone: {json.dumps(alone.summary().get('click'))}", flush=True)
            elapsed_batch, _, _ = run_phase([batcher(batch_alone)], args.batch_seconds, worker)
            print(f"batch alone: {json.dumps(batch_alone.summary().get('batch'))}", flush=True)
            elapsed2, before2, after2 = run_phase(
                [batcher(mixed), *(clicker(i, mixed) for i in range(args.batch_clickers))], args.batch_seconds, worker
            )
            print(f"clicks during batches: {json.dumps(mixed.summary().get('click'))}", flush=True)
            cache = metric_lines(base, "gsb_embedding_cache")
            errors = metric_lines(base, "gsb_errors_total")
            peak = memory_mb(worker)["VmHWM"]
        finally:
            server.terminate()
            server.wait(30)
            images.shutdown()

    failures = interactive.failures + alone.failures + batch_alone.failures + mixed.failures + warm.failures
    result = {
        "cpu": describe_cpu(),
        "segmenter": args.segmenter,
        "server": {"gunicorn_workers": 1, "threads": args.threads},
        "interactive": {
            "clients": args.clients, "seconds": round(elapsed1, 1), "shared_images": args.images,
            **interactive.summary(),
            "throughput_rps": round(sum(len(v) for v in interactive.latencies.values()) / elapsed1, 1),
            "rss_mb_start": before1["VmRSS"], "rss_mb_end": after1["VmRSS"],
        },
        "clicks_alone": {"clickers": args.batch_clickers, "seconds": round(elapsed_alone, 1), **alone.summary()},
        "batch_alone": {
            "batch_size": 4, "seconds": round(elapsed_batch, 1), **batch_alone.summary(),
            "batch_tasks_per_s": round(4 * len(batch_alone.latencies.get("batch", [])) / elapsed_batch, 2),
        },
        "clicks_during_batch": {
            "clickers": args.batch_clickers, "batch_size": 4, "seconds": round(elapsed2, 1), **mixed.summary(),
            "batch_tasks_per_s": round(4 * len(mixed.latencies.get("batch", [])) / elapsed2, 2),
            "rss_mb_start": before2["VmRSS"], "rss_mb_end": after2["VmRSS"],
        },
        "worker_peak_rss_mb": peak,
        "embedding_cache": cache,
        "errors_total": errors,
        "ok": not failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("worker_peak_rss_mb", "errors_total", "ok")}))
    print(f"wrote {args.out}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
