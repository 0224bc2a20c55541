"""Personal access tokens against the real Label Studio: exchange, refresh on 401, revocation.

A personal access token (PAT) is a JWT *refresh* token: Label Studio refuses it as a credential
and wants it exchanged at ``/api/token/refresh/`` for a short-lived access token. The unit tests
(tests/test_images.py) prove the loader's logic against a fake; these prove that the fake's idea
of Label Studio is right: the real one issues the PAT, accepts the exchanged token for an uploaded
image, answers 401 to an access token it did not sign (so the loader's one refresh-and-retry is
what rescues the load), and refuses a revoked or forged PAT at the exchange.

The loader runs in-process so every HTTP exchange it makes can be recorded: which URL, which
Authorization header, which status.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import requests
import urllib3
from PIL import Image, ImageOps

from backend import images as images_module
from backend.config import Settings
from backend.images import ImageLoader, ImageLoadError, pixel_sha256

from .grounded_project import label_config, write_images
from .label_studio import LabelStudio

pytestmark = pytest.mark.e2e

REFRESH_PATH = "/api/token/refresh/"


class Sent(NamedTuple):
    method: str
    path: str
    authorization: str | None
    status: int


class RecordingLoader(NamedTuple):
    loader: ImageLoader
    sent: list[Sent]  # every HTTP exchange the loader made, in order

    def exchanges(self) -> int:
        """Completed PAT exchanges (each is one POST to the refresh endpoint)."""
        return sum(s.method == "POST" and s.path == REFRESH_PATH for s in self.sent)


def recording_loader(label_studio: LabelStudio, api_key: str) -> RecordingLoader:
    """A fresh loader (empty token and byte caches) configured with ``api_key``, whose HTTP
    exchanges are recorded by wrapping its one request primitive."""
    loader = ImageLoader(Settings(label_studio_url=label_studio.url, label_studio_api_key=api_key))
    sent: list[Sent] = []
    original: Callable[..., AbstractContextManager[urllib3.BaseHTTPResponse]] = loader._request

    @contextmanager
    def recorded(
        method: str, url: str, headers: dict[str, str], *args: Any, **kwargs: Any
    ) -> Iterator[urllib3.BaseHTTPResponse]:
        with original(method, url, headers, *args, **kwargs) as response:
            sent.append(Sent(method, urlsplit(url).path, headers.get("Authorization"), response.status))
            yield response

    loader._request = recorded  # type: ignore[method-assign]
    return RecordingLoader(loader, sent)


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def forged_jwt(claims: dict[str, Any]) -> str:
    """A well-formed HS256 JWT with ``claims`` and a signature Label Studio never made."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{signature}"


class UploadedImage(NamedTuple):
    task: dict[str, Any]
    sha256: str  # of the file's displayed pixels, as LoadedImage.sha256 hashes them


@pytest.fixture(scope="module")
def uploaded(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> list[UploadedImage]:
    """A project with three uploaded images; their tasks hold relative ``/data/upload/...`` URLs."""
    files = write_images(tmp_path_factory.mktemp("token-images"))
    project_id = label_studio.api.create_project("personal access tokens", label_config("box"))["id"]
    label_studio.api.import_files(project_id, [f.path for f in files])
    tasks = label_studio.api.list_tasks(project_id)
    assert len(tasks) == len(files)
    result = []
    for task in tasks:
        assert task["data"]["image"].startswith("/data/upload/"), task["data"]
        (path,) = [f.path for f in files if task["data"]["image"].endswith(f"-{f.path.name}")]
        result.append(UploadedImage(task, _displayed_sha256(path)))
    return result


def _displayed_sha256(path: Path) -> str:
    with Image.open(path) as image:
        return pixel_sha256(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.fixture
def personal_access_token(label_studio: LabelStudio) -> Iterator[str]:
    """A PAT created through Label Studio's API, revoked afterwards (one live PAT per user)."""
    token = label_studio.api.create_personal_access_token()
    yield token
    label_studio.api.revoke_personal_access_token(token)


def test_personal_access_token_is_exchanged_and_the_access_token_loads_the_upload(
    label_studio: LabelStudio, uploaded: list[UploadedImage], personal_access_token: str
) -> None:
    assert jwt_claims(personal_access_token)["token_type"] == "refresh"
    recording = recording_loader(label_studio, personal_access_token)

    loaded = recording.loader.load(uploaded[0].task, "image")

    assert loaded.sha256 == uploaded[0].sha256
    assert recording.exchanges() == 1
    assert recording.sent[0] == Sent("POST", REFRESH_PATH, None, 200)
    authorizations = {s.authorization for s in recording.sent if s.method == "GET"}
    (bearer,) = authorizations
    access = bearer.removeprefix("Bearer ")
    assert bearer.startswith("Bearer ") and jwt_claims(access)["token_type"] == "access"
    assert recording.sent[-1].status == 200
    # Why the exchange is needed: Label Studio takes the access token and refuses the PAT itself.
    whoami = f"{label_studio.url}/api/current-user/whoami"
    assert requests.get(whoami, headers={"Authorization": bearer}, timeout=30).status_code == 200
    refused = requests.get(whoami, headers={"Authorization": f"Bearer {personal_access_token}"}, timeout=30)
    assert refused.status_code == 401


def test_access_token_refused_with_401_is_exchanged_again_once_and_the_load_retried(
    label_studio: LabelStudio, uploaded: list[UploadedImage], personal_access_token: str
) -> None:
    recording = recording_loader(label_studio, personal_access_token)
    recording.loader.load(uploaded[0].task, "image")
    (cache_key,) = recording.loader._access_tokens
    issued = recording.loader._access_tokens[cache_key]
    # Same claims as the real one, a later expiry, a signature Label Studio never made: the
    # loader cannot tell it is bad, only Label Studio's 401 can.
    forged = forged_jwt({**jwt_claims(issued), "exp": int(time.time()) + 3600})
    assert not images_module._expires_soon(forged)
    recording.loader._access_tokens[cache_key] = forged
    before = len(recording.sent)

    loaded = recording.loader.load(uploaded[1].task, "image")  # another image: not in the byte cache

    assert loaded.sha256 == uploaded[1].sha256
    after = recording.sent[before:]
    assert recording.exchanges() == 2, after
    first, exchange, retried = after[0], after[1], after[2]
    assert (first.method, first.authorization, first.status) == ("GET", f"Bearer {forged}", 401), after
    assert exchange == Sent("POST", REFRESH_PATH, None, 200), after
    renewed = recording.loader._access_tokens[cache_key]
    assert renewed != forged
    # The retry is the same URL with the renewed token, and nothing after it used the forged one.
    assert (retried.method, retried.path, retried.authorization) == ("GET", first.path, f"Bearer {renewed}"), after
    assert all(s.authorization != f"Bearer {forged}" for s in after[1:]), after
    assert after[-1].status == 200, after


def _revoked(label_studio: LabelStudio, personal_access_token: str) -> str:
    assert label_studio.api.revoke_personal_access_token(personal_access_token)
    return personal_access_token


def _forged(label_studio: LabelStudio, personal_access_token: str) -> str:
    return forged_jwt(jwt_claims(personal_access_token))


@pytest.mark.parametrize(
    ("make_bad_token", "reason"),
    [(_revoked, "Token is blacklisted"), (_forged, "Token is invalid")],
    ids=["revoked", "forged"],
)
def test_revoked_or_forged_personal_access_token_is_a_clear_error(
    label_studio: LabelStudio,
    uploaded: list[UploadedImage],
    personal_access_token: str,
    make_bad_token: Callable[[LabelStudio, str], str],
    reason: str,
) -> None:
    bad = make_bad_token(label_studio, personal_access_token)
    recording = recording_loader(label_studio, bad)

    with pytest.raises(ImageLoadError, match=rf"refused the personal access token .*\(HTTP 401: {reason}\)") as refused:
        recording.loader.load(uploaded[2].task, "image")
    with pytest.raises(ImageLoadError, match=reason):  # the next task is refused without asking again
        recording.loader.load(uploaded[1].task, "image")

    assert uploaded[2].task["data"]["image"] in str(refused.value)  # says which task and image
    # Refused at the exchange once, remembered for the next task, and no image request went out
    # with the PAT or without a token.
    assert recording.sent == [Sent("POST", REFRESH_PATH, None, 401)], recording.sent
