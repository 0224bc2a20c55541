"""Run this backend as users do (``grounded-sam-backend serve``: gunicorn, real model loading) on
a loopback port, for the end-to-end tests against a real Label Studio.

The models are the tiny random GroundingDINO and SAM of ``tests/tiny_models.py`` and
``tests/tiny_sam_models.py``, saved to a folder and loaded through ``DETECTOR_MODEL`` /
``SEGMENTER_MODEL`` like a user's local checkpoint. With random weights both thresholds are 0
and ``MAX_DETECTIONS`` caps the count, so every output control gets regions (what they cover is
arbitrary; their types, labels and sizes are not).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import requests

from tests.tiny_models import build_tiny_grounding_dino
from tests.tiny_sam_models import build_tiny_sam

from .label_studio import REPO_ROOT, _log, _stop_group, _tail, free_port

# Loading the tiny models takes seconds; gunicorn start and imports (torch, transformers) take
# 10-40 s on this 2-core machine while Label Studio is busy too.
DEFAULT_STARTUP_TIMEOUT_S = 240.0
TINY_MODEL_SETTINGS = {
    "DEVICE": "cpu",
    "DTYPE": "float32",
    "BOX_THRESHOLD": "0",
    "TEXT_THRESHOLD": "0",
    "MAX_DETECTIONS": "4",
}


def build_tiny_models(folder: Path) -> dict[str, str]:
    """Save tiny random detector and segmenter under ``folder``; returns the settings naming them."""
    return {
        "DETECTOR_MODEL": str(build_tiny_grounding_dino(folder / "grounding-dino")),
        "SEGMENTER_MODEL": str(build_tiny_sam(folder / "sam")),
        **TINY_MODEL_SETTINGS,
    }


class BackendServer:
    """``grounded-sam-backend serve`` in its own process group, as a context manager.

    Ready means ``/health`` reports ``model_state == "ready"``: Label Studio's connect and
    /predict calls must not race the model loading. Stopping kills the whole group (gunicorn
    forks its worker). The log stays at ``workdir/backend.log``; ``log_tail`` is for failure
    reports.
    """

    def __init__(self, workdir: Path, settings: dict[str, str], startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S):
        self.workdir = Path(workdir)
        self.settings = settings
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "backend.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings)
        env.update(
            {
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                # Image and embedding caches of this run only: nothing leaks between runs.
                "IMAGE_CACHE_DIR": str(self.workdir / "image-cache"),
                "EMBEDDING_CACHE_DIR": str(self.workdir / "embedding-cache"),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self) -> None:
        """Start the server and wait until its models are loaded; on failure print the log tail and stop."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The console script of the environment running the tests (CI: .venv/bin).
        command = [str(Path(sys.executable).parent / "grounded-sam-backend"), "serve"]
        _log(f"starting backend {' '.join(command)} on {self.url}")
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            _log(f"backend did not start; last lines of {self.log_path}:\n{self.log_tail()}")
            self.stop()
            raise
        _log(f"backend ready at {self.url} after {time.monotonic() - started:.0f} s")

    def _wait_ready(self, started: float) -> None:
        assert self._process is not None
        state = "not answering"
        while time.monotonic() - started < self.startup_timeout:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(f"backend exited with code {code} during start-up; log {self.log_path}")
            try:
                health = requests.get(f"{self.url}/health", timeout=5).json()
                state = health.get("model_state", "missing")
                if state == "ready":
                    return
                if state == "error":
                    raise RuntimeError(f"backend models failed to load: {health.get('error')}")
            except requests.RequestException:
                pass  # gunicorn not bound yet
            time.sleep(0.5)
        raise RuntimeError(f"backend not ready within {self.startup_timeout:.0f} s (model_state: {state})")

    def log_tail(self, lines: int = 80) -> str:
        return _tail(self.log_path, lines)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (Prometheus text; labels in the metric's label order), 0.0 when
        the series does not exist yet."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in requests.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    def stop(self) -> None:
        """Stop the process group (TERM, then KILL after 20 s). Safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            _stop_group(process, grace=20.0)
            _log(f"backend stopped (pid {process.pid}, exit {process.returncode})")

    def __enter__(self) -> BackendServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
