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
Teredo and NAT64 IPv6 forms are unwrapped), unless the host is the ``LABEL_STUDIO_URL`` origin
or listed in ``ALLOWED_IMAGE_HOSTS`` (host names, matching any port; IPs or networks such as
``10.0.0.0/8``, matching the resolved addresses). A ``/setup`` hostname is no exemption: any
client that reaches the backend can post one, so it would open every internal URL; it still
resolves Label Studio paths and gets the ``/setup`` token, but a Label Studio on a private or
loopback address must be named in ``LABEL_STUDIO_URL`` or ``ALLOWED_IMAGE_HOSTS``. Cloud
metadata addresses (unwrapped the same way) are refused even when exempt. The connection goes
to the address that was checked (TLS still verifies the host name), so a name cannot resolve
differently between check and connect (DNS rebinding). Consequently downloads do not go through
``HTTP(S)_PROXY``.

Each download attempt has one wall-clock deadline, ``DOWNLOAD_TIMEOUT_S``, for connecting, the
TLS handshake, the response headers and the body together, redirects and a token exchange
included: socket timeouts bound each read, not their sum, so a server dripping a header line
at a time would otherwise hold a worker forever. At the deadline a watchdog shuts the socket
down, which wakes the blocked read.

A load can also be given an absolute deadline (``time.monotonic()``): ``/predict``'s
``PREDICT_TIME_BUDGET_S``, which ``DOWNLOAD_TIMEOUT_S`` alone does not respect since one image may
take ``MAX_TRIES`` attempts plus back-off sleeps. Each attempt's deadline is then cut to the time
left, and a retry whose back-off would end past it is not made: the task fails at the deadline
with an error naming the budget. The ``Predictor`` between ``/predict`` and the loader does not
pass one, so ``/predict`` sets it around the prediction with ``load_deadline``.

Downloads are cached by URL (Label Studio paths by Label Studio URL + path, cloud URIs by the
URI, not the presigned URL): in memory in an LRU bounded by bytes, and with ``IMAGE_CACHE_DIR``
on disk, written atomically and never evicted (prune it with ``find -mtime``). Cached images are
assumed immutable, as Label Studio's uploads are (their names carry a random prefix). Bytes are
cached only once they decode; a cached entry that no longer decodes (a disk file damaged
outside this process) is deleted and downloaded again. Disk cache failures are warned about
once per kind and process, then logged at debug level: a full or read-only disk must not
flood the log with a line per image.

``LoadedImage.sha256`` hashes the decoded RGB pixels and the size, not the file bytes: the
embedding cache (whose disk tier outlives the process) must miss when the same bytes would
decode differently after a change here, and should hit when two URLs hold the same picture.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.certs import where as ca_bundle_path
from urllib3.connection import HTTPConnection, HTTPSConnection

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

# The absolute time.monotonic() by which the image loads of this context must end; None: unbounded.
_LOAD_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("image_load_deadline", default=None)


@contextlib.contextmanager
def load_deadline(deadline: float | None) -> Iterator[None]:
    """Every ``ImageLoader.load`` in the block (in this thread) ends by ``deadline``, a
    ``time.monotonic()`` value (None: no bound): how ``/predict``'s time budget reaches loads it
    makes through the ``Predictor``, which passes no deadline itself."""
    token = _LOAD_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _LOAD_DEADLINE.reset(token)


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
    configured: bool  # LABEL_STUDIO_URL (exempt from the SSRF guard), not a /setup hostname


class _Raw(NamedTuple):
    """Bytes to decode, where they came from, and what the download caches know of them."""

    data: bytes
    source: str
    cache_key: str | None = None  # downloads only: cached under this key once the bytes decode
    cached_in: str | None = None  # "memory" or "disk" when served from a cache
    refetch: Callable[[], bytes] | None = None  # with cached_in: download again, past the caches


class _Deadline:
    """One download attempt's wall-clock limit, from its first connection to its last byte.

    Socket timeouts bound each read, not their sum; at the deadline a timer thread shuts down
    the attempt's sockets, which wakes a read blocked on a server that drips bytes. It shuts
    down a duplicate of each socket's descriptor: shutdown acts on the connection, not the
    descriptor, and the duplicate stays valid when TLS wrapping detaches the original.
    """

    def __init__(self, seconds: float) -> None:
        self._expires = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self._expires - time.monotonic()

    def passed(self) -> bool:
        return self._expired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (at once if it has passed)."""
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self._expired:
                _shutdown(duplicate)

    def release(self) -> None:
        """Close the duplicates of the sockets watched so far (their exchanges are over)."""
        with self._lock:  # never while _expire shuts them down: a closed descriptor may be reused
            for duplicate in self._sockets:
                duplicate.close()
            self._sockets = []

    def cancel(self) -> None:
        self._timer.cancel()
        self.release()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            for duplicate in self._sockets:
                _shutdown(duplicate)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer or by urllib3
        pass


class _Watched:
    """Connection mixin: the attempt's ``_Deadline`` watches the socket as soon as it is
    connected, before the TLS handshake (which a server can drip as well)."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        self._deadline.watch(sock)
        return sock


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


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


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, 6to4, Teredo client, NAT64), if any:
    the guard must judge where a packet really goes."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
    if embedded is None and address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return embedded


def _is_metadata(address: IPAddress) -> bool:
    return address in METADATA_ADDRESSES or _embedded_ipv4(address) in METADATA_ADDRESSES


def _not_public_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public internet address, or None when it is."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = _not_public_reason(embedded)
        return f"{reason}, embedded {embedded}" if reason else None
    for attribute in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{attribute}"):
            return attribute.replace("_", "-")
    if not address.is_global:
        return "non-global"
    return None


V = TypeVar("V")


class _MemoryLRU(Generic[V]):
    """Values by key, bounded by the total of the sizes given to ``put``: clicks on one task
    reload its image."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def pop(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self._size -= old[1] if old is not None else 0

    def put(self, key: str, value: V, size: int) -> None:
        if size > self._budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._size -= old[1] if old is not None else 0
            self._items[key] = (value, size)
            self._size += size
            while self._size > self._budget:
                _, (_, evicted) = self._items.popitem(last=False)
                self._size -= evicted


class ImageLoader:
    """Resolves and loads task images under the limits and guards in ``Settings``.

    Thread-safe; one instance serves the whole process. ``backoff_s`` is the first retry delay
    (doubled per try); ``memory_cache_bytes`` bounds the in-memory download cache and
    ``decoded_cache_bytes`` the decoded images kept by the digest of their bytes: every click
    on a task reloads its image, and decoding, EXIF rotation and the pixel hash took 5.6-7.6 ms
    of a click (bench/NOTES.md) where the byte digest takes ~0.1 ms. The cached images are
    shared: callers must not modify them in place (nothing in the backend does).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        memory_cache_bytes: int = 64 * 1024 * 1024,
        decoded_cache_bytes: int = 64 * 1024 * 1024,
        backoff_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self._backoff_s = backoff_s
        self._memory: _MemoryLRU[bytes] = _MemoryLRU(memory_cache_bytes)
        self._decoded: _MemoryLRU[tuple[Image.Image, str]] = _MemoryLRU(decoded_cache_bytes)
        self._access_tokens: dict[tuple[str, str], str] = {}
        self._refused_tokens: dict[tuple[str, str], tuple[float, str]] = {}  # key -> (when, why)
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # disk cache failure kinds already warned about
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
        *,
        deadline: float | None = None,
    ) -> LoadedImage:
        """Load ``task["data"][value_key]``; ``hostname`` / ``access_token`` come from ``/setup``.

        ``deadline`` (``time.monotonic()``; None: the one ``load_deadline`` set, if any) bounds
        the downloads, retries and back-off sleeps together (see the module docstring).
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
            with load_deadline(_LOAD_DEADLINE.get() if deadline is None else deadline):
                raw = self._read(value, task_id, hostname, access_token)
                image, sha256 = self._decode_and_cache(raw)
        except ImageLoadError as exc:
            raise ImageLoadError(f"{where} = {_shorten(value)!r}: {exc}") from exc
        except ValueError as exc:  # urllib.parse on malformed URLs ("http://[x", bad ports)
            raise ImageLoadError(f"{where} = {_shorten(value)!r}: malformed reference: {exc}") from exc
        return LoadedImage(image, image.width, image.height, sha256, raw.source)

    def _decode_and_cache(self, raw: _Raw) -> tuple[Image.Image, str]:
        """The decoded image and its pixel hash, from the decoded-image cache when these bytes
        were decoded before. Downloaded bytes are cached only once they decode, and a cached
        entry that no longer does (a damaged disk file) is replaced by downloading it again,
        instead of failing forever."""
        digest = hashlib.sha256(raw.data).hexdigest()
        decoded = self._decoded.get(digest)
        if decoded is not None:
            self._cache_bytes(raw)
            return decoded
        try:
            image = self._decode(raw.data)
        except ImageLoadError as exc:
            if raw.cache_key is None or raw.refetch is None:
                raise
            self._warn_once(
                "corrupt", "image cache entry for %s does not decode (%s); deleting it and downloading again",
                raw.source, exc,
            )
            self._forget(raw.cache_key)
            raw = _Raw(raw.refetch(), raw.source, raw.cache_key)
            image = self._decode(raw.data)
            digest = hashlib.sha256(raw.data).hexdigest()
        self._cache_bytes(raw)
        decoded = (image, pixel_sha256(image))
        self._decoded.put(digest, decoded, image.width * image.height * len(image.getbands()))
        return decoded

    def _cache_bytes(self, raw: _Raw) -> None:
        """Keep downloaded bytes in memory (and on disk when they came from the network)."""
        if raw.cache_key is not None and raw.cached_in != "memory":
            self._memory.put(raw.cache_key, raw.data, len(raw.data))
            if raw.cached_in is None:
                self._disk_put(raw.cache_key, raw.data)

    # ------------------------------------------------------------------ resolution

    def _label_studio(self, hostname: str | None, access_token: str | None) -> _LabelStudio | None:
        configured = bool(self.settings.label_studio_url)
        if configured:
            base, token = self.settings.label_studio_url, self.settings.label_studio_api_key or access_token
        elif hostname:
            base, token = hostname, access_token
        else:
            return None
        parts = urlsplit(base.strip())
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ImageLoadError(f"the Label Studio URL {base!r} must be an absolute http:// or https:// URL")
        return _LabelStudio(base.strip().rstrip("/"), _origin(parts), token or "", configured)

    def _read(self, value: str, task_id: Any, hostname: str | None, access_token: str | None) -> _Raw:
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

    def _read_label_studio_path(self, path: str, hostname: str | None, access_token: str | None) -> _Raw:
        if path.startswith("/data/local-files") and self.settings.allow_local_files:
            relative = (parse_qs(urlsplit(path).query).get("d") or [""])[-1]
            if not relative:
                raise ImageLoadError("the Local Storage URL has no ?d= file path")
            local = self._local_path(relative.lstrip("/"))
            if os.path.isfile(local):
                return _Raw(self._read_file(local), local)
        ls = self._require_label_studio(hostname, access_token, "a Label Studio path")
        candidates = [ls.base_url + path]
        if path.startswith("/data/upload/"):
            filepath = path[len("/data/") :]
            candidates.insert(0, f"{ls.base_url}/storage-data/uploaded/?filepath={filepath}")
        return self._download(candidates, ls.base_url + path, ls)

    def _read_data_uri(self, value: str) -> _Raw:
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
        return _Raw(raw, f"data:{header.split(';')[0] or 'text/plain'} ({len(raw)} bytes)")

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

    def _read_local(self, value: str) -> _Raw:
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
        return _Raw(self._read_file(local), local)

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

    def _download(self, candidates: list[str], cache_key: str, ls: _LabelStudio | None) -> _Raw:
        """From the caches, else the first candidate URL that serves it (``_decode_and_cache``
        stores what decodes)."""
        source = _display_url(cache_key) if "://" in cache_key else cache_key

        def fetch() -> bytes:
            for url in candidates[:-1]:
                try:
                    return self._fetch_with_retries(url, ls)
                except _FetchError as exc:
                    if exc.status not in FALLBACK_STATUSES:
                        raise
                    log.debug("%s; trying the next candidate URL", exc)
            return self._fetch_with_retries(candidates[-1], ls)

        for cached_in, get in (("memory", self._memory.get), ("disk", self._disk_get)):
            cached = get(cache_key)
            if cached is not None:
                return _Raw(cached, source, cache_key, cached_in, fetch)
        return _Raw(fetch(), source, cache_key)

    def _forget(self, cache_key: str) -> None:
        self._memory.pop(cache_key)
        path = self._disk_path(cache_key)
        if path is None:
            return
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._warn_once("write", "image cache delete failed for %s: %s", path, exc)

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        """A warning for the first disk cache failure of each kind in this process, debug lines
        after it: a full or read-only disk fails every image, and the log must stay readable."""
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        if first:
            log.warning(message + " (further image cache %s failures are logged at debug level)", *args, kind)
        else:
            log.debug(message, *args)

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
            self._warn_once("read", "image cache read failed for %s: %s", path, exc)
            return None

    def _disk_put(self, cache_key: str, data: bytes) -> None:
        """Write via a temporary file and ``os.replace`` so readers never see half a file."""
        path = self._disk_path(cache_key)
        if path is None:
            return
        temporary: str | None = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".tmp-", delete=False) as tmp:
                temporary = tmp.name
                tmp.write(data)
            os.replace(temporary, path)
        except OSError as exc:
            self._warn_once("write", "image cache write failed for %s: %s", path, exc)
            if temporary is not None:  # a full disk must not fill up further with partial files
                with contextlib.suppress(OSError):
                    os.remove(temporary)

    # ------------------------------------------------------------------ HTTP

    def _fetch_with_retries(self, url: str, ls: _LabelStudio | None) -> bytes:
        """Up to ``MAX_TRIES`` attempts with back-off, all within the load's deadline, if any."""
        load_by = _LOAD_DEADLINE.get()
        delay = self._backoff_s
        attempt = 1
        while True:
            seconds = self.settings.download_timeout_s
            if load_by is not None:
                left = load_by - time.monotonic()
                if left <= 0:
                    raise self._out_of_budget(url)
                seconds = min(seconds, left)
            try:
                return self._fetch(url, ls, seconds)
            except _FetchError as exc:
                # an attempt cut short at the load's deadline reads as DOWNLOAD_TIMEOUT_S otherwise
                if load_by is not None and time.monotonic() >= load_by:
                    raise self._out_of_budget(url, exc) from exc
                if not exc.transient:
                    raise
                if attempt >= MAX_TRIES:
                    raise _FetchError(f"{exc} (gave up after {MAX_TRIES} tries)", exc.status) from exc
                wait = delay if exc.retry_after is None else min(exc.retry_after, MAX_RETRY_AFTER_S)
                if load_by is not None and time.monotonic() + wait >= load_by:
                    raise self._out_of_budget(url, exc) from exc  # the retry would start too late
                log.info("retrying %s in %.1fs: %s", _display_url(url), wait, exc)
                time.sleep(wait)
            attempt += 1
            delay *= 2

    def _out_of_budget(self, url: str, last: _FetchError | None = None) -> _FetchError:
        """The error of a download the load's deadline stopped, with the last attempt's error."""
        budget = f"PREDICT_TIME_BUDGET_S={self.settings.predict_time_budget_s:g}"
        message = f"{_display_url(url)}: not downloaded within the request's time budget ({budget})"
        return _FetchError(message + (f"; last try: {last}" if last is not None else ""))

    def _fetch(self, url: str, ls: _LabelStudio | None, seconds: float) -> bytes:
        """One attempt: GET ``url`` within one deadline of ``seconds`` (``DOWNLOAD_TIMEOUT_S``,
        or less when the load's deadline is nearer), following redirects by hand so every hop
        is checked and the token is attached only where the hop's origin is Label Studio's."""
        deadline = _Deadline(seconds)
        try:
            refresh = False  # after a 401 to an access token: exchange the PAT again, once
            refreshed = False
            hops = 0
            while True:
                token_to = ls if ls is not None and ls.token and _origin(urlsplit(url)) == ls.origin else None
                headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
                if token_to is not None:
                    headers["Authorization"] = self._authorization(token_to, deadline, force_refresh=refresh)
                    refresh = False
                with self._request("GET", url, headers, ls, deadline) as response:
                    status = response.status
                    if (
                        status == 401
                        and token_to is not None
                        and not refreshed
                        and _is_refresh_token(token_to.token)
                    ):
                        refreshed = refresh = True
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
                    return self._read_body(response, url, deadline)
        finally:
            deadline.cancel()

    def _timed_out(self, url: str, in_body: bool) -> _FetchError:
        """The deadline's error. Before a complete response it is retried, as a server that did
        not answer in time may next time; a body that takes too long is not: another try would
        cost another ``DOWNLOAD_TIMEOUT_S`` for the same slow stream."""
        limit = f"DOWNLOAD_TIMEOUT_S={self.settings.download_timeout_s}"
        if in_body:
            return _FetchError(f"{_display_url(url)}: download took longer than {limit}")
        return _FetchError(
            f"{_display_url(url)}: no complete response within {limit} (connect, headers and body)", transient=True
        )

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str, deadline: _Deadline) -> bytes:
        limit = self.settings.max_image_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _FetchError(f"{_display_url(url)} is {declared} bytes, over MAX_IMAGE_BYTES={limit}")
        body = bytearray()
        try:
            # read1, not stream(): stream(n) blocks until n bytes arrive, so a server sending a
            # byte per second would never reach the deadline check (each read is within timeout)
            while chunk := response.read1(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise _FetchError(f"{_display_url(url)} sent more than MAX_IMAGE_BYTES={limit} bytes")
                if deadline.passed():
                    raise self._timed_out(url, in_body=True)
        except urllib3.exceptions.HTTPError as exc:
            if deadline.passed():
                raise self._timed_out(url, in_body=True) from exc
            raise _FetchError(f"{_display_url(url)}: download interrupted: {exc}", transient=True) from exc
        if deadline.passed():  # the watchdog's shutdown reads as the end of a body without a length
            raise self._timed_out(url, in_body=True)
        return bytes(body)

    @contextlib.contextmanager
    def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        ls: _LabelStudio | None,
        deadline: _Deadline,
        body: bytes | None = None,
    ) -> Iterator[urllib3.BaseHTTPResponse]:
        """One HTTP exchange with the host's checked addresses, tried in resolver order, within
        what is left of the attempt's ``deadline``."""
        parts = urlsplit(url)
        addresses = self._checked_addresses(parts, ls)
        host = parts.hostname or ""
        host_header = f"[{host}]" if ":" in host else host
        if parts.port:
            host_header += f":{parts.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        last_error: Exception | None = None
        for address in addresses:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timed_out(url, in_body=False)
            # the socket timeouts bound single reads; the deadline's watchdog bounds their sum
            timeout = urllib3.Timeout(connect=min(10.0, remaining), read=remaining)
            pool = self._pool(parts, str(address), timeout, deadline)
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
                deadline.release()
                last_error = exc
                continue
            except urllib3.exceptions.HTTPError as exc:
                pool.close()
                deadline.release()
                if deadline.passed():
                    raise self._timed_out(url, in_body=False) from exc
                raise _FetchError(f"{_display_url(url)}: request failed: {exc}", transient=True) from exc
            try:
                if deadline.passed():  # the watchdog's shutdown can end a header block early
                    raise self._timed_out(url, in_body=False)
                yield response
            finally:
                response.release_conn()
                pool.close()
                deadline.release()
            return
        if deadline.passed():
            raise self._timed_out(url, in_body=False)
        raise _FetchError(f"{_display_url(url)}: cannot connect: {last_error}", transient=True)

    def _pool(
        self, parts: SplitResult, address: str, timeout: urllib3.Timeout, deadline: _Deadline
    ) -> urllib3.HTTPConnectionPool:
        port = _port(parts)
        if parts.scheme.lower() == "https":
            return _WatchedHTTPSPool(
                address,
                port,
                timeout=timeout,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                ca_certs=ca_bundle_path(),
                server_hostname=parts.hostname,
                assert_hostname=parts.hostname,
                deadline=deadline,
            )
        return _WatchedHTTPPool(address, port, timeout=timeout, retries=False, deadline=deadline)

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
        is_label_studio = ls is not None and (scheme, host, port) == ls.origin
        # only the operator's LABEL_STUDIO_URL: a /setup hostname is whatever a client posted
        exempt = host in self._allowed_hosts or (is_label_studio and ls is not None and ls.configured)
        for address in addresses:
            if _is_metadata(address):
                raise _FetchError(f"refused to fetch {shown}: {host} resolves to {address} (cloud metadata address)")
            if exempt or any(address in network for network in self._allowed_networks):
                continue
            reason = _not_public_reason(address)
            if reason and is_label_studio:
                raise _FetchError(
                    f"refused to fetch {shown}: {host} resolves to {address} (not public: {reason}); a Label "
                    "Studio URL sent to /setup is not trusted with private addresses: set LABEL_STUDIO_URL to "
                    f"this Label Studio or add {host} to ALLOWED_IMAGE_HOSTS"
                )
            if reason:
                raise _FetchError(
                    f"refused to fetch {shown}: {host} resolves to {address} (not public: {reason}); only "
                    "public addresses, the LABEL_STUDIO_URL host and ALLOWED_IMAGE_HOSTS are fetched"
                )
        return addresses

    # ------------------------------------------------------------------ tokens

    def _authorization(self, ls: _LabelStudio, deadline: _Deadline, force_refresh: bool = False) -> str:
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
                access = self._exchange_refresh_token(ls, deadline)
            except _FetchError as exc:
                if not exc.transient:
                    with self._lock:
                        self._refused_tokens[key] = (time.monotonic(), str(exc))
                raise
            with self._lock:
                self._access_tokens[key] = access
                self._refused_tokens.pop(key, None)
        return f"Bearer {access}"

    def _exchange_refresh_token(self, ls: _LabelStudio, deadline: _Deadline) -> str:
        url = f"{ls.base_url}/api/token/refresh/"
        body = json.dumps({"refresh": ls.token}).encode()
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json", "Accept": "application/json"}
        with self._request("POST", url, headers, ls, deadline, body=body) as response:
            status = response.status
            try:
                payload = response.read(64 * 1024)
            except urllib3.exceptions.HTTPError as exc:
                # transient either way: only Label Studio's answer may mark the token as refused
                if deadline.passed():
                    raise self._timed_out(url, in_body=False) from exc
                raise _FetchError(f"{_display_url(url)}: answer interrupted: {exc}", transient=True) from exc
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
