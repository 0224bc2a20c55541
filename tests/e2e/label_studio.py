"""Install, start and talk to a real Label Studio for end-to-end tests.

Label Studio pins its own Django, redis, rq, pytz ... so it lives in a virtualenv of its own
(``.ls-venv`` at the repository root, or ``$LS_VENV`` so CI can cache it between runs), never in
the backend's environment. The server runs on SQLite in a per-session data directory with a
known user and legacy API token, and with the SSRF / local-IP guards off, because the backend
under test listens on 127.0.0.1 (LabelStudioServer.environment says why each setting is needed).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import requests

LS_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Cold start runs all migrations first: 40 s on an idle machine, 60-160 s on this 2-core one under
# load (load average 6), also for the first start after a fresh install (bytecode is compiled then).
# The bound is generous because a crash is detected at once (the process exits); only a hang waits it out.
DEFAULT_STARTUP_TIMEOUT_S = 420.0
# pip resolves and downloads about 1 GB; 1.5-3 min here, far more on a slow mirror.
INSTALL_TIMEOUT_S = 1200.0


def _log(message: str) -> None:
    """Print progress at once: installs and cold starts take minutes and must not look hung."""
    print(f"[label-studio e2e] {message}", flush=True)


def _tail(path: Path, lines: int = 80) -> str:
    """Last lines of a log file, for error messages that explain a failed install or start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"


def default_venv_path() -> Path:
    """Where Label Studio's virtualenv lives: ``$LS_VENV`` (set by CI to a cached path) or ``.ls-venv``."""
    return Path(os.environ.get("LS_VENV") or REPO_ROOT / ".ls-venv")


def _installed_version(python: Path) -> str | None:
    """Version of label-studio installed in the venv of ``python``; None if absent or unreadable."""
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_label_studio(venv_path: Path) -> Path:
    """Return the ``label-studio`` executable in ``venv_path``, creating the venv and installing
    ``label-studio==LS_VERSION`` first when it is absent or another version.

    Raises RuntimeError naming the failed step and the tail of pip's output, so that a CI failure
    says why instead of surfacing later as a missing executable.
    """
    venv_path = Path(venv_path).absolute()
    python = venv_path / "bin" / "python"
    executable = venv_path / "bin" / "label-studio"
    found = _installed_version(python)
    if found == LS_VERSION and executable.exists():
        _log(f"using label-studio {found} from {venv_path}")
        return executable

    started = time.monotonic()
    if not python.exists():
        _log(f"creating virtualenv {venv_path}")
        created = subprocess.run(
            [sys.executable, "-m", "venv", str(venv_path)], capture_output=True, text=True, timeout=300
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"could not create Label Studio's virtualenv {venv_path} "
                f"(exit {created.returncode}):\n{created.stdout}{created.stderr}"
            )
    _log(
        f"installing label-studio=={LS_VERSION} into {venv_path} (found: {found or 'none'}); "
        "about 1 GB, usually 1.5-3 min"
    )
    log_path = venv_path / "pip-install-label-studio.log"
    with log_path.open("w") as log:
        try:
            installed = subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    f"label-studio=={LS_VERSION}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"pip install label-studio=={LS_VERSION} took over {INSTALL_TIMEOUT_S:.0f} s; "
                f"log {log_path}:\n{_tail(log_path)}"
            ) from exc
    if installed.returncode != 0 or not executable.exists():
        raise RuntimeError(
            f"pip install label-studio=={LS_VERSION} into {venv_path} failed (exit {installed.returncode}); "
            f"log {log_path}:\n{_tail(log_path)}"
        )
    _log(f"installed label-studio {LS_VERSION} in {time.monotonic() - started:.0f} s")
    return executable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LabelStudioServer:
    """A Label Studio process on a loopback port, as a context manager.

    It runs in its own session (setsid) so that stopping it kills the whole process group
    (Label Studio forks workers), SIGTERM first and SIGKILL after a grace period, also when
    start-up fails. Its log stays at ``data_dir/label-studio.log``; its tail is printed when
    start-up fails.
    """

    username = "admin@example.com"

    def __init__(
        self,
        executable: Path,
        data_dir: Path,
        *,
        port: int | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        self.executable = Path(executable)
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_hex(8)
        # Legacy tokens are 40 hex characters; a fixed one per run lets tests authenticate at once.
        self.token = secrets.token_hex(20)
        self.log_path = self.data_dir / "label-studio.log"
        self._process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        """Process environment for Label Studio: SQLite in ``data_dir``, a known user and token, no network."""
        tmp = self.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                # Prefixed name: LS reads LABEL_STUDIO_<NAME> before <NAME>, so a stray DJANGO_DB cannot win.
                "LABEL_STUDIO_DJANGO_DB": "sqlite",
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.token,
                # "Token <key>" auth only works if legacy tokens are on when the org is created.
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                # Both spellings: LS reads LABEL_STUDIO_<NAME> first, then <NAME>.
                "SSRF_PROTECTION_ENABLED": "false",
                "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
                "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
                "LABEL_STUDIO_HOST": self.url,
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                "LOCAL_FILES_SERVING_ENABLED": "true",
                # No internet here: no version check, analytics or Sentry traffic.
                "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
                "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "TMPDIR": str(tmp),
            }
        )
        return env

    def start(self) -> None:
        """Start Label Studio and wait until it answers ``/health`` and accepts the token.

        On any failure (or interrupt) the log tail is printed and the process group stopped.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.executable),
            "start",
            "--no-browser",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--internal-host",
            "127.0.0.1",
        ]
        _log(f"starting {' '.join(command)} (data dir {self.data_dir})")
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(started)
            self._check_token()
        except BaseException:
            _log(f"Label Studio did not start; last lines of {self.log_path}:\n{_tail(self.log_path)}")
            self.stop()
            raise
        _log(f"Label Studio is up at {self.url} after {time.monotonic() - started:.0f} s")

    def _wait_ready(self, started: float) -> None:
        """Poll ``/health`` until 200, the process dies, or the start-up bound passes."""
        assert self._process is not None
        next_report = started + 15
        while True:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(f"Label Studio exited with code {code} during start-up; log {self.log_path}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass  # not listening yet: migrations run before the server binds
            now = time.monotonic()
            if now - started > self.startup_timeout:
                raise RuntimeError(
                    f"Label Studio did not answer {self.url}/health within {self.startup_timeout:.0f} s; "
                    f"log {self.log_path}"
                )
            if now >= next_report:
                _log(f"waiting for {self.url}/health ... {now - started:.0f} s")
                next_report = now + 15
            time.sleep(1)

    def _check_token(self) -> None:
        """Fail at start-up, not in the first test, if the legacy token is refused."""
        answer = requests.get(
            f"{self.url}/api/current-user/whoami",
            headers={"Authorization": f"Token {self.token}"},
            timeout=30,
        )
        if answer.status_code != 200:
            raise RuntimeError(f"Label Studio refused the API token (HTTP {answer.status_code}): {answer.text[:500]}")

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after 20 s. Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        _stop_group(process, grace=20.0)
        _log(f"Label Studio stopped (pid {process.pid}, exit {process.returncode})")

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """Kill the process group led by ``process`` (started with setsid): TERM, wait, then KILL.

    KILL goes to the group even when the leader left in time, so forked children that
    ignored TERM do not outlive the test session.
    """
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class LSApiError(RuntimeError):
    """A Label Studio API call answered an unexpected status; keeps it for assertions."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class LSApi:
    """Thin wrapper over Label Studio's REST API with the legacy token.

    Returns decoded JSON and raises LSApiError on an unexpected status, so tests can assert
    on both the happy path and Label Studio's refusals (e.g. connecting a dead backend: 400).
    """

    def __init__(self, base_url: str, token: str, timeout: float = 180.0) -> None:
        self.base_url = base_url.rstrip("/")
        # Generous: retrieving predictions waits for the backend's /predict (LS allows it 100 s).
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, path: str, expect: Iterable[int] = (200, 201), **kwargs: Any) -> Any:
        """Call ``path`` and return its JSON (None for an empty body); LSApiError otherwise."""
        kwargs.setdefault("timeout", self.timeout)
        answer = self.session.request(method, f"{self.base_url}{path}", **kwargs)
        if answer.status_code not in tuple(expect):
            raise LSApiError(method, path, answer.status_code, answer.text)
        return answer.json() if answer.content else None

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        """Create a project; Label Studio wants a title of at least 3 characters."""
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config})

    def import_files(self, project_id: int, paths: Iterable[Path]) -> dict[str, Any]:
        """Upload image files as tasks (multipart). The answer counts tasks but names no ids:
        use list_tasks afterwards.

        Each file gets its own form field: Label Studio reads ``request.FILES.items()``, which
        keeps only the last file of a repeated field name.
        """
        opened = [Path(p).open("rb") for p in paths]
        try:
            files = [(f"file{i}", (Path(f.name).name, f)) for i, f in enumerate(opened)]
            return self.request("POST", f"/api/projects/{project_id}/import", files=files)
        finally:
            for f in opened:
                f.close()

    def list_tasks(self, project_id: int, page_size: int = 100) -> list[dict[str, Any]]:
        """All tasks of a project, following pages until Label Studio's 404 "Invalid page."."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = self.session.get(
                f"{self.base_url}/api/tasks",
                params={"project": project_id, "page": page, "page_size": page_size},
                timeout=self.timeout,
            )
            if answer.status_code == 404 and page > 1:
                return tasks
            if answer.status_code != 200:
                raise LSApiError("GET", "/api/tasks", answer.status_code, answer.text)
            batch = answer.json()["tasks"]
            tasks.extend(batch)
            if len(batch) < page_size:
                return tasks
            page += 1

    def connect_ml(self, project_id: int, url: str, *, interactive: bool = True, title: str = "backend") -> int:
        """Connect an ML backend and return its id. Label Studio calls its /health and /setup
        first and answers 400 (LSApiError.status) with the reason if either fails."""
        created = self.request(
            "POST",
            "/api/ml",
            json={"project": project_id, "url": url, "title": title, "is_interactive": interactive},
        )
        return int(created["id"])

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The project's ML backends; Label Studio refreshes each ``state`` ("CO" connected,
        "DI" disconnected, "ER" error) by calling its /health when listing."""
        return self.request("GET", "/api/ml", params={"project": project_id})

    def retrieve_predictions(self, project_id: int) -> dict[str, Any]:
        """Ask Label Studio to fetch predictions for every task lacking one of the current
        model_version (one /predict call to the backend), as the Data Manager action does."""
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": {"all": True, "excluded": []}},
        )

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        """Stored predictions of one task (Label Studio answers a plain list)."""
        return self.request("GET", "/api/predictions/", params={"task": task_id})

    def interactive(self, ml_id: int, task_id: int, context: dict[str, Any]) -> dict[str, Any]:
        """Label Studio's interactive-annotating call: ``{"data": results[0]}`` on success;
        backend failures come back as HTTP 200 ``{"errors": [...]}``, so check both keys."""
        return self.request(
            "POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context}
        )

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        """Submit an annotation (fires ANNOTATION_CREATED at the backend's /webhook)."""
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})

    def export(self, project_id: int) -> list[dict[str, Any]]:
        """The project's JSON export, as a user downloads it."""
        return self.request("GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON"})

    def create_personal_access_token(self) -> str:
        """Turn personal access tokens on for the organization and create one for this user.

        The settings POST names both switches: the serializer saves what it is given, and the
        legacy token this client authenticates with must stay enabled. Label Studio allows one
        live personal token per user (HTTP 409 otherwise): revoke it when done.
        """
        self.request("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
        return self.request("POST", "/api/token/")["token"]

    def revoke_personal_access_token(self, token: str) -> bool:
        """Blacklist a personal access token; False when Label Studio says it already was (404)."""
        path = "/api/token/blacklist/"
        answer = self.session.post(f"{self.base_url}{path}", json={"refresh": token}, timeout=self.timeout)
        if answer.status_code not in (204, 404):
            raise LSApiError("POST", path, answer.status_code, answer.text)
        return answer.status_code == 204


class LabelStudio(NamedTuple):
    """What tests get from the ``label_studio`` fixture: where it runs, the token, a client, and
    the first user's login for browser tests."""

    url: str
    token: str
    api: LSApi
    username: str
    password: str
