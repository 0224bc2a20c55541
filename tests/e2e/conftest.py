"""Session fixture: one real Label Studio for all end-to-end tests.

Installing (minutes, once per cache) and cold-starting (up to ~2 min) Label Studio is far too
slow to repeat per test. Failing to install or start it is an ERROR, never a skip: only an
explicit ``SKIP_E2E=1`` skips, so a broken environment cannot pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .backend_server import BackendServer, build_tiny_models
from .label_studio import LabelStudio, LabelStudioServer, LSApi, default_venv_path, ensure_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """Install (if needed) and start Label Studio; stop its whole process group afterwards."""
    if os.environ.get("SKIP_E2E") == "1":
        reason = "SKIP_E2E=1 is set: end-to-end tests against a real Label Studio are skipped"
        print(reason, flush=True)
        pytest.skip(reason)
    executable = ensure_label_studio(default_venv_path())
    with LabelStudioServer(executable, tmp_path_factory.mktemp("label-studio")) as server:
        yield LabelStudio(
            server.url, server.token, LSApi(server.url, server.token), server.username, server.password
        )


@pytest.fixture(scope="session")
def backend_server(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """This backend served as users run it (``grounded-sam-backend serve``) on tiny random models.

    Depends on ``label_studio`` so that ``SKIP_E2E=1`` skips it too. Label Studio runs on
    loopback, which the SSRF guard refuses even as the hostname Label Studio sends to /setup
    (a client could name any host there), so it is allow-listed as a user must; not set as
    ``LABEL_STUDIO_URL``, so the images still come through the /setup hostname and token.
    """
    workdir = tmp_path_factory.mktemp("backend")
    settings = {**build_tiny_models(workdir / "models"), "ALLOWED_IMAGE_HOSTS": "127.0.0.1"}
    with BackendServer(workdir, settings) as server:
        yield server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the backend's log tail to every failed test that used it: Label Studio reports
    only the backend's answer, the reason is in this log."""
    report = yield
    server = getattr(item, "funcargs", {}).get("backend_server")
    if report.failed and isinstance(server, BackendServer):
        report.sections.append((f"backend log {server.log_path} (last lines)", server.log_tail()))
    return report
