"""Task image resolution and loading: Label Studio paths, URLs, cloud URIs, data URIs, files.

What ``task.data[value_key]`` may hold, and where the bytes come from:

* ``http(s)://...``: fetched directly.
* Label Studio paths (``/data/upload/...``, ``upload/...``, ``/data/local-files/?d=...``,
  ``/tasks/<id>/resolve/...``, ``/storage-data/...``, ``/api/...``): fetched from Label Studio.
  ``/data/upload/X`` is tried as ``/storage-data/uploaded/?filepath=upload/X`` first (works for
  cloud-backed default storage) and ``/data/upload/X`` second, as label-studio-sdk does.
  ``/data/local-files/?d=p`` is read from ``LOCAL_FILES_ROOT/p`` when local files are allowed
  and the file is there.
* ``s3://``, ``gs://``, ``azure-blob://``: Label Studio presigns them at
  ``/tasks/<task id>/presign/?fileuri=<base64url>`` and redirects to the bucket.
* ``data:`` URIs: decoded in place.
* ``file:`` URIs and plain paths: only with ``ALLOW_LOCAL_FILES`` and only under
  ``LOCAL_FILES_ROOT`` (symlinks resolved first, so they cannot lead out).

Which Label Studio, which token: ``LABEL_STUDIO_URL`` with ``LABEL_STUDIO_API_KEY`` (or the
``/setup`` token when no key is set). Without ``LABEL_STUDIO_URL`` the ``/setup`` hostname is
used with the ``/setup`` token only: the operator's key never goes to a host named in a request.
The token is sent only to the Label Studio origin (scheme, host, port), hop by hop, so a
redirect to a bucket never carries it (label-studio-ml-backend#429). Legacy tokens go as
``Token <key>``; personal access tokens (JWT refresh tokens) are exchanged at
``/api/token/refresh/`` for an access token sent as ``Bearer``, cached, and exchanged again when
it expires or Label Studio answers 401.

SSRF guard: every hop's host is resolved and refused when any address is loopback, private,
link-local, multicast, reserved, unspecified or otherwise not global (IPv4-mapped, 6to4,
Teredo and NAT64 IPv6 forms are unwrapped), unless the host is the Label Studio host or listed
in ``ALLOWED_IMAGE_HOSTS`` (host names, matching any port; IPs or networks such as
``10.0.0.0/8``, matching the resolved addresses). Cloud metadata addresses are refused even
then. The connection goes to the address that was checked (TLS still verifies the host name),
so a name cannot resolve differently between check and connect (DNS rebinding). Consequently
downloads do not go through ``HTTP(S)_PROXY``.

Downloads are cached by URL (Label Studio paths by Label Studio URL + path, cloud URIs by the
URI, not the presigned URL): in memory in an LRU bounded by bytes, and with ``IMAGE_CACHE_DIR``
on disk, written atomically and never evicted (prune it with ``find -mtime``). Cached images are
assumed immutable, as Label Studio's uploads are (their names carry a random prefix).

``LoadedImage.sha256`` hashes the decoded RGB pixels and the size, not the file bytes: the
embedding cache (whose disk tier outlives the process) must miss when the same bytes would
decode differently after a change here, and should hit when two URLs hold the same picture.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.certs import where as ca_bundle_path

from backend.config import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_TRIES = 3  # attempts per URL on 429, 5xx and connection errors
MAX_RETRY_AFTER_S = 10.0  # a Retry-After longer than this is shortened, not obeyed
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
FALLBACK_STATUSES = frozenset({400, 401, 403, 404})  # try the next candidate URL on these
LS_PATH_PREFIXES = ("/data/", "/tasks/", "/storage-data/", "/api/")
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
USER_AGENT = "grounded-sam-backend"
TOKEN_EXPIRY_MARGIN_S = 30.0
# A refused personal access token is not offered again for this long: a batch of thousands of
# tasks with a revoked token fails each task at once instead of knocking on Label Studio's door.
TOKEN_REFUSAL_MEMORY_S = 60.0
_CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Instance metadata services: never fetched, whatever the allow-list says.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageLoadError(ValueError):
    """The task's image cannot be loaded; the message names the task key, URL and reason."""


class _FetchError(ImageLoadError):
    """A failed HTTP exchange, with what the retry and fallback logic needs to know."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.retry_after = retry_after


def pixel_sha256(image: Image.Image) -> str:
    """The content hash of a decoded image (``LoadedImage.sha256``): its size and pixels.

    Public so that a model adapter handed only the image (a ``Segmenter.embed``) can name the
    same embedding-cache entry the pipeline names with the loader's hash.
    """
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedImage:
    """A decoded task image: RGB, EXIF orientation applied (the size Label Studio displays)."""

    image: Image.Image
    width: int
    height: int
    sha256: str  # of the decoded RGB pixels and the size (see the module docstring)
    source: str  # where the bytes came from, without credentials or query strings


@dataclass(frozen=True)
class _LabelStudio:
    base_url: str  # without trailing slash; may carry a path prefix
    origin: tuple[str, str, int]  # scheme, lower-case host, port: the only place the token goes
    token: str


def _display_url(url: str) -> str:
    """A URL for messages: no user info, no query (presigned URLs carry signatures)."""
    parts = urlsplit(url)
    host_and_port = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host_and_port}{parts.path}" + ("?..." if parts.query else "")


def _shorten(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _port(parts: SplitResult) -> int:
    try:
        return parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError as exc:  # urllib raises on a non-numeric or out-of-range port
        raise _FetchError(f"{_display_url(parts.geturl())}: invalid port") from exc


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    return parts.scheme.lower(), (parts.hostname or "").lower().rstrip("."), _port(parts)


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """The unverified payload of a JWT, or None for a legacy token.

    Only used to tell token kinds apart and to read ``exp``; Label Studio verifies the token.
    Written out instead of importing PyJWT, which is only a transitive dependency.
    """
    segments = token.split(".")
    if len(segments) != 3:
        return None
    try:
        decoded = [json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))) for s in segments[:2]]
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    header, payload = decoded
    return payload if isinstance(header, dict) and isinstance(payload, dict) else None


def _is_refresh_token(token: str) -> bool:
    """A personal access token: a JWT refresh token to exchange, not to send."""
    claims = _jwt_claims(token)
    return claims is not None and claims.get("token_type") == "refresh"


def _not_public_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public internet address, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = _not_public_reason(embedded)
            return f"{reason}, embedded {embedded}" if reason else None
    for attribute in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{attribute}"):
            return attribute.replace("_", "-")
    if not address.is_global:
        return "non-global"
    return None


class _MemoryLRU:
    """Downloaded bytes by cache key, bounded by total size: clicks on one task reload its image."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self._budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._size -= len(old) if old is not None else 0
            self._items[key] = data
            self._size += len(data)
            while self._size > self._budget:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)


class ImageLoader:
    """Resolves and loads task images under the limits and guards in ``Settings``.

    Thread-safe; one instance serves the whole process. ``backoff_s`` is the first retry delay
    (doubled per try); ``memory_cache_bytes`` bounds the in-memory download cache.
    """

    def __init__(
        self, settings: Settings, *, memory_cache_bytes: int = 64 * 1024 * 1024, backoff_s: float = 0.5
    ) -> None:
        self.settings = settings
        self._backoff_s = backoff_s
        self._memory = _MemoryLRU(memory_cache_bytes)
        self._access_tokens: dict[tuple[str, str], str] = {}
        self._refused_tokens: dict[tuple[str, str], tuple[float, str]] = {}  # key -> (when, why)
        self._lock = threading.Lock()
        self._allowed_hosts: set[str] = set()
        self._allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (e.strip().lower().strip("[]") for e in settings.allowed_image_hosts.split(",")):
            if not entry:
                continue
            try:
                self._allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._allowed_hosts.add(entry.rstrip("."))
        # Pillow refuses images above 2x its own limit on open; never let it be stricter than
        # MAX_IMAGE_PIXELS, which this module checks itself before decoding.
        if Image.MAX_IMAGE_PIXELS is not None and settings.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    # ------------------------------------------------------------------ public

    def load(
        self,
        task: dict[str, Any],
        value_key: str,
        hostname: str | None = None,
        access_token: str | None = None,
    ) -> LoadedImage:
        """Load ``task["data"][value_key]``; ``hostname`` / ``access_token`` come from ``/setup``.

        Raises ``ImageLoadError`` for every failure, with the task key and reason.
        """
        task_id = task.get("id")
        data = task.get("data")
        value = data.get(value_key) if isinstance(data, dict) else None
        where = f"task {task_id} data[{value_key!r}]"
        if not isinstance(value, str) or not value.strip():
            raise ImageLoadError(f"{where} holds no image reference (got {_shorten(repr(value))})")
        value = value.strip()
        try:
            raw, source = self._read(value, task_id, hostname, access_token)
            image = self._decode(raw)
        except ImageLoadError as exc:
            raise ImageLoadError(f"{where} = {_shorten(value)!r}: {exc}") from exc
        except ValueError as exc:  # urllib.parse on malformed URLs ("http://[x", bad ports)
            raise ImageLoadError(f"{where} = {_shorten(value)!r}: malformed reference: {exc}") from exc
        return LoadedImage(image, image.width, image.height, pixel_sha256(image), source)

    # ------------------------------------------------------------------ resolution

    def _label_studio(self, hostname: str | None, access_token: str | None) -> _LabelStudio | None:
        if self.settings.label_studio_url:
            base, token = self.settings.label_studio_url, self.settings.label_studio_api_key or access_token
        elif hostname:
            base, token = hostname, access_token
        else:
            return None
        parts = urlsplit(base.strip())
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ImageLoadError(f"the Label Studio URL {base!r} must be an absolute http:// or https:// URL")
        return _LabelStudio(base.strip().rstrip("/"), _origin(parts), token or "")

    def _read(self, value: str, task_id: Any, hostname: str | None, access_token: str | None) -> tuple[bytes, str]:
        """The raw bytes behind ``value`` and a description of where they came from."""
        lowered = value.lower()
        if lowered.startswith("data:"):
            return self._read_data_uri(value)
        scheme = urlsplit(value).scheme.lower()
        if scheme in _DEFAULT_PORTS:
            ls = self._label_studio(hostname, access_token)
            return self._download([value], value, ls)
        if lowered.startswith(CLOUD_SCHEMES):
            ls = self._require_label_studio(hostname, access_token, "a cloud storage URI")
            if task_id is None:
                raise ImageLoadError("a cloud storage URI needs the task id to be presigned by Label Studio")
            fileuri = base64.urlsafe_b64encode(value.encode()).decode()
            return self._download([f"{ls.base_url}/tasks/{task_id}/presign/?fileuri={fileuri}"], value, ls)
        if value.startswith(("upload/", "/upload/")):
            value = "/data/" + value.lstrip("/")
        if value.startswith(LS_PATH_PREFIXES):
            return self._read_label_studio_path(value, hostname, access_token)
        return self._read_local(value)

    def _require_label_studio(self, hostname: str | None, access_token: str | None, what: str) -> _LabelStudio:
        ls = self._label_studio(hostname, access_token)
        if ls is None:
            raise ImageLoadError(
                f"{what} is served by Label Studio, but no Label Studio URL is known: set "
                "LABEL_STUDIO_URL or connect the backend from Label Studio (its /setup call passes one)"
            )
        if not ls.token:
            raise ImageLoadError(
                f"{what} needs a Label Studio API token: set LABEL_STUDIO_API_KEY (with "
                "LABEL_STUDIO_URL) or connect the backend from Label Studio"
            )
        return ls

    def _read_label_studio_path(self, path: str, hostname: str | None, access_token: str | None) -> tuple[bytes, str]:
        if path.startswith("/data/local-files") and self.settings.allow_local_files:
            relative = (parse_qs(urlsplit(path).query).get("d") or [""])[-1]
            if not relative:
                raise ImageLoadError("the Local Storage URL has no ?d= file path")
            local = self._local_path(relative.lstrip("/"))
            if os.path.isfile(local):
                return self._read_file(local), local
        ls = self._require_label_studio(hostname, access_token, "a Label Studio path")
        candidates = [ls.base_url + path]
        if path.startswith("/data/upload/"):
            filepath = path[len("/data/") :]
            candidates.insert(0, f"{ls.base_url}/storage-data/uploaded/?filepath={filepath}")
        return self._download(candidates, ls.base_url + path, ls)

    def _read_data_uri(self, value: str) -> tuple[bytes, str]:
        header, comma, payload = value[len("data:") :].partition(",")
        if not comma:
            raise ImageLoadError("malformed data URI: no ',' before the data")
        limit = self.settings.max_image_bytes
        if header.lower().endswith(";base64"):
            payload = re.sub(r"\s+", "", payload)
            if len(payload) // 4 * 3 > limit:
                raise ImageLoadError(
                    f"data URI holds about {len(payload) // 4 * 3} bytes, over MAX_IMAGE_BYTES={limit}"
                )
            try:
                raw = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
            except binascii.Error as exc:
                raise ImageLoadError(f"data URI is not valid base64: {exc}") from exc
        else:
            raw = unquote_to_bytes(payload)
        if len(raw) > limit:
            raise ImageLoadError(f"data URI holds {len(raw)} bytes, over MAX_IMAGE_BYTES={limit}")
        return raw, f"data:{header.split(';')[0] or 'text/plain'} ({len(raw)} bytes)"

    # ------------------------------------------------------------------ local files

    def _local_path(self, path: str) -> str:
        """``path`` (absolute, or relative to LOCAL_FILES_ROOT) if it resolves under the root."""
        if not self.settings.allow_local_files:
            raise ImageLoadError(
                "local file paths are refused: set ALLOW_LOCAL_FILES=true and LOCAL_FILES_ROOT to serve them"
            )
        if not self.settings.local_files_root:
            raise ImageLoadError("local files are allowed but LOCAL_FILES_ROOT is not set")
        root = os.path.realpath(self.settings.local_files_root)
        resolved = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([resolved, root]) != root:
            raise ImageLoadError(f"path {path!r} is outside LOCAL_FILES_ROOT ({root})")
        return resolved

    def _read_local(self, value: str) -> tuple[bytes, str]:
        parts = urlsplit(value)
        if parts.scheme.lower() == "file":
            if parts.netloc not in {"", "localhost"}:
                raise ImageLoadError(f"file URI on another host ({parts.netloc}) cannot be read")
            path = unquote(parts.path)
        elif parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
            raise ImageLoadError(f"unsupported URL scheme {parts.scheme!r}")
        else:
            path = value
        local = self._local_path(path)
        if not os.path.isfile(local):
            raise ImageLoadError(f"no such file under LOCAL_FILES_ROOT: {local}")
        return self._read_file(local), local

    def _read_file(self, path: str) -> bytes:
        limit = self.settings.max_image_bytes
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > limit:
                    raise ImageLoadError(f"{path} has {size} bytes, over MAX_IMAGE_BYTES={limit}")
                return handle.read(limit + 1)
        except OSError as exc:
            raise ImageLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------ download + caches

    def _download(self, candidates: list[str], cache_key: str, ls: _LabelStudio | None) -> tuple[bytes, str]:
        source = _display_url(cache_key) if "://" in cache_key else cache_key
        cached = self._memory.get(cache_key)
        if cached is None:
            cached = self._disk_get(cache_key)
            if cached is not None:
                self._memory.put(cache_key, cached)
        if cached is not None:
            return cached, source
        for url in candidates[:-1]:
            try:
                data = self._fetch_with_retries(url, ls)
                break
            except _FetchError as exc:
                if exc.status not in FALLBACK_STATUSES:
                    raise
                log.debug("%s; trying the next candidate URL", exc)
        else:
            data = self._fetch_with_retries(candidates[-1], ls)
        self._memory.put(cache_key, data)
        self._disk_put(cache_key, data)
        return data, source

    def _disk_path(self, cache_key: str) -> str | None:
        directory = self.settings.image_cache_dir
        if not directory:
            return None
        return os.path.join(directory, hashlib.sha256(cache_key.encode()).hexdigest())

    def _disk_get(self, cache_key: str) -> bytes | None:
        path = self._disk_path(cache_key)
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size > self.settings.max_image_bytes:
                    return None
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("image cache read failed for %s: %s", path, exc)
            return None

    def _disk_put(self, cache_key: str, data: bytes) -> None:
        """Write via a temporary file and ``os.replace`` so readers never see half a file."""
        path = self._disk_path(cache_key)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".tmp-", delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except OSError as exc:
            log.warning("image cache write failed for %s: %s", path, exc)

    # ------------------------------------------------------------------ HTTP

    def _fetch_with_retries(self, url: str, ls: _LabelStudio | None) -> bytes:
        delay = self._backoff_s
        attempt = 1
        while True:
            try:
                return self._fetch(url, ls)
            except _FetchError as exc:
                if not exc.transient:
                    raise
                if attempt >= MAX_TRIES:
                    raise _FetchError(f"{exc} (gave up after {MAX_TRIES} tries)", exc.status) from exc
                wait = delay if exc.retry_after is None else min(exc.retry_after, MAX_RETRY_AFTER_S)
                log.info("retrying %s in %.1fs: %s", _display_url(url), wait, exc)
                time.sleep(wait)
            attempt += 1
            delay *= 2

    def _fetch(self, url: str, ls: _LabelStudio | None) -> bytes:
        """GET ``url``, following redirects by hand so every hop is checked and the token
        is attached only where the hop's origin is Label Studio's."""
        refreshed = False
        hops = 0
        while True:
            token_to = ls if ls is not None and ls.token and _origin(urlsplit(url)) == ls.origin else None
            headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
            if token_to is not None:
                headers["Authorization"] = self._authorization(token_to)
            with self._request("GET", url, headers, ls) as response:
                status = response.status
                if status == 401 and token_to is not None and not refreshed and _is_refresh_token(token_to.token):
                    refreshed = True
                    self._authorization(token_to, force_refresh=True)
                    continue
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise _FetchError(f"{_display_url(url)} answered HTTP {status} without a Location")
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise _FetchError(f"{_display_url(url)}: more than {MAX_REDIRECTS} redirects")
                    url = urljoin(url, location)
                    continue
                if status >= 400:
                    raise _FetchError(
                        f"{_display_url(url)} answered HTTP {status}",
                        status=status,
                        transient=status in RETRY_STATUSES,
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                return self._read_body(response, url)

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str) -> bytes:
        limit = self.settings.max_image_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _FetchError(f"{_display_url(url)} is {declared} bytes, over MAX_IMAGE_BYTES={limit}")
        deadline = time.monotonic() + self.settings.download_timeout_s
        body = bytearray()
        try:
            # read1, not stream(): stream(n) blocks until n bytes arrive, so a server sending a
            # byte per second would never reach the deadline check (each read is within timeout)
            while chunk := response.read1(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise _FetchError(f"{_display_url(url)} sent more than MAX_IMAGE_BYTES={limit} bytes")
                if time.monotonic() > deadline:
                    raise _FetchError(
                        f"{_display_url(url)}: download took longer than "
                        f"DOWNLOAD_TIMEOUT_S={self.settings.download_timeout_s}"
                    )
        except urllib3.exceptions.HTTPError as exc:
            raise _FetchError(f"{_display_url(url)}: download interrupted: {exc}", transient=True) from exc
        return bytes(body)

    @contextmanager
    def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        ls: _LabelStudio | None,
        body: bytes | None = None,
    ) -> Iterator[urllib3.BaseHTTPResponse]:
        """One HTTP exchange with the host's checked addresses, tried in resolver order."""
        parts = urlsplit(url)
        addresses = self._checked_addresses(parts, ls)
        host = parts.hostname or ""
        host_header = f"[{host}]" if ":" in host else host
        if parts.port:
            host_header += f":{parts.port}"
        timeout = urllib3.Timeout(
            connect=min(10.0, self.settings.download_timeout_s), read=self.settings.download_timeout_s
        )
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        last_error: Exception | None = None
        for address in addresses:
            pool = self._pool(parts, str(address), timeout)
            try:
                response = pool.urlopen(
                    method,
                    path,
                    body=body,
                    headers={**headers, "Host": host_header},
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    assert_same_host=False,
                )
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
                pool.close()
                last_error = exc
                continue
            except urllib3.exceptions.HTTPError as exc:
                pool.close()
                raise _FetchError(f"{_display_url(url)}: request failed: {exc}", transient=True) from exc
            try:
                yield response
            finally:
                response.release_conn()
                pool.close()
            return
        raise _FetchError(f"{_display_url(url)}: cannot connect: {last_error}", transient=True)

    def _pool(self, parts: SplitResult, address: str, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
        port = _port(parts)
        if parts.scheme.lower() == "https":
            return urllib3.HTTPSConnectionPool(
                address,
                port,
                timeout=timeout,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                ca_certs=ca_bundle_path(),
                server_hostname=parts.hostname,
                assert_hostname=parts.hostname,
            )
        return urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)

    def _checked_addresses(self, parts: SplitResult, ls: _LabelStudio | None) -> list[IPAddress]:
        """The host's addresses, after the SSRF guard (see the module docstring)."""
        scheme, host, port = _origin(parts)
        shown = _display_url(parts.geturl())
        if scheme not in _DEFAULT_PORTS:
            raise _FetchError(f"{shown}: only http and https URLs are fetched")
        if not host:
            raise _FetchError(f"{shown}: the URL has no host")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _FetchError(f"{shown}: cannot resolve host {host!r}: {exc}") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        exempt = host in self._allowed_hosts or (ls is not None and (scheme, host, port) == ls.origin)
        for address in addresses:
            unwrapped = getattr(address, "ipv4_mapped", None) or address
            if unwrapped in METADATA_ADDRESSES:
                raise _FetchError(f"refused to fetch {shown}: {host} resolves to {address} (cloud metadata address)")
            if exempt or any(address in network for network in self._allowed_networks):
                continue
            reason = _not_public_reason(address)
            if reason:
                raise _FetchError(
                    f"refused to fetch {shown}: {host} resolves to {address} (not public: {reason}); only "
                    "public addresses, the Label Studio host and ALLOWED_IMAGE_HOSTS are fetched"
                )
        return addresses

    # ------------------------------------------------------------------ tokens

    def _authorization(self, ls: _LabelStudio, force_refresh: bool = False) -> str:
        """The Authorization header value for Label Studio (see the module docstring)."""
        claims = _jwt_claims(ls.token)
        if claims is None:
            return f"Token {ls.token}"
        if not _is_refresh_token(ls.token):
            return f"Bearer {ls.token}"
        key = (ls.base_url, ls.token)
        with self._lock:
            access = self._access_tokens.get(key)
            refused = self._refused_tokens.get(key)
        if force_refresh or access is None or _expires_soon(access):
            if refused is not None and time.monotonic() - refused[0] < TOKEN_REFUSAL_MEMORY_S:
                raise _FetchError(refused[1])
            try:
                access = self._exchange_refresh_token(ls)
            except _FetchError as exc:
                if not exc.transient:
                    with self._lock:
                        self._refused_tokens[key] = (time.monotonic(), str(exc))
                raise
            with self._lock:
                self._access_tokens[key] = access
                self._refused_tokens.pop(key, None)
        return f"Bearer {access}"

    def _exchange_refresh_token(self, ls: _LabelStudio) -> str:
        url = f"{ls.base_url}/api/token/refresh/"
        body = json.dumps({"refresh": ls.token}).encode()
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json", "Accept": "application/json"}
        with self._request("POST", url, headers, ls, body=body) as response:
            status = response.status
            payload = response.read(64 * 1024)
        if status != 200:
            transient = status in RETRY_STATUSES
            raise _FetchError(
                f"Label Studio refused the personal access token at {_display_url(url)} (HTTP {status}"
                f"{_detail(payload)}); create a new token or set a legacy one",
                # a refused token is final: no other candidate URL would be served either
                status=status if transient else None,
                transient=transient,
            )
        try:
            access = json.loads(payload).get("access")
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str) or not access:
            raise _FetchError(f"{_display_url(url)} answered without an access token")
        return access

    # ------------------------------------------------------------------ decoding

    def _decode(self, raw: bytes) -> Image.Image:
        """RGB image with EXIF orientation applied; size checked from the header first."""
        try:
            image = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"refused a decompression bomb: {exc}") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"not an image Pillow can read ({len(raw)} bytes starting {raw[:12]!r})") from exc
        width, height = image.size
        limit = self.settings.max_image_pixels
        if width * height > limit:
            raise ImageLoadError(f"{width}x{height} = {width * height} pixels, over MAX_IMAGE_PIXELS={limit}")
        if width == 0 or height == 0:
            raise ImageLoadError(f"the image is empty ({width}x{height})")
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageLoadError(f"corrupt or truncated {image.format or ''} image: {exc}") from exc
        return _to_rgb(oriented)


def _detail(payload: bytes) -> str:
    """``: <Label Studio's reason>`` from a JSON error body such as ``{"detail": "Token is
    blacklisted"}``, else nothing."""
    try:
        detail = json.loads(payload).get("detail")
    except (ValueError, AttributeError):
        return ""
    return f": {_shorten(detail)}" if isinstance(detail, str) and detail else ""


def _retry_after(header: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    if not header:
        return None
    if header.strip().isdigit():
        return float(header.strip())
    try:
        return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _expires_soon(token: str) -> bool:
    expiry = (_jwt_claims(token) or {}).get("exp")
    return isinstance(expiry, int | float) and expiry - TOKEN_EXPIRY_MARGIN_S < time.time()


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit gray from 16-bit, 32-bit integer or float gray.

    16-bit modes scale the full 0..65535 range to 0..255 (what browsers display for a 16-bit
    PNG, so the model sees what the annotator sees). ``I`` and ``F`` are read by their range:
    already 0..255 as is, 0..65535 as 16-bit, floats in 0..1 as fractions, anything else
    stretched from its minimum to its maximum. Nothing is clipped.
    """
    if mode.startswith("I;16"):
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(data.min()), float(data.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = data * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = data
    elif low >= 0.0 and high <= 65535.0:
        scaled = data * (255.0 / 65535.0)
    else:
        scaled = (data - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is dropped (the colour under it is kept)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in {"I", "F"}:
        return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    try:
        if mode in {"P", "PA"} or "transparency" in image.info:
            image = image.convert("RGBA")  # Pillow warns when palette transparency goes straight to RGB
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(f"cannot convert a {mode} image to RGB: {exc}") from exc
