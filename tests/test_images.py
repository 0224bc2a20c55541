"""Task image loading: resolution, Label Studio tokens, SSRF guard, limits, decoding, caches.

Servers are real ``http.server`` instances on 127.0.0.1 in threads; every request they get is
recorded, so tests can assert both what was sent and that a refused URL was never contacted.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from backend import images as images_module
from backend.config import Settings
from backend.images import ImageLoader, ImageLoadError, pixel_sha256
from tests.conftest import png_bytes

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Responder = Callable[[Hit], tuple[int, dict[str, str], bytes]]


class _Handler(BaseHTTPRequestHandler):
    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        hit = Hit(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
        self.server.hits.append(hit)  # type: ignore[attr-defined]
        status, headers, payload = self.server.respond(hit)  # type: ignore[attr-defined]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "no-length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[str, list[Hit]]]]:
    """``serve(respond, tls=None) -> (base_url, hits)``: an HTTP(S) server on 127.0.0.1."""
    servers: list[ThreadingHTTPServer] = []

    def start(respond: Responder, tls: ssl.SSLContext | None = None) -> tuple[str, list[Hit]]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        server.respond = respond  # type: ignore[attr-defined]
        server.hits = []  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{server.server_address[1]}", server.hits  # type: ignore[attr-defined]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fake_dns(monkeypatch: pytest.MonkeyPatch, mapping: dict[str, str]) -> None:
    """Resolve the given names to the given addresses; everything else as usual."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host in mapping:
            family = socket.AF_INET6 if ":" in mapping[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (mapping[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def sample_png(width: int = 48, height: int = 32) -> bytes:
    pixels = np.random.default_rng(width * 7 + height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def task(value: str, task_id: int = 1) -> dict:
    return {"id": task_id, "data": {"image": value}}


def loader(**settings: object) -> ImageLoader:
    return ImageLoader(Settings(**settings), backoff_s=0.01)


def jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def image_response(payload: bytes) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "image/png"}, payload


class FakeLabelStudio:
    """Serves uploads behind token auth, the PAT exchange, presigning and redirects."""

    def __init__(self, pat: str | None = None, other_base: str = "") -> None:
        self.pat = pat
        self.other_base = other_base
        self.access_tokens: list[str] = []
        self.image = sample_png()

    def rotate_access_token(self) -> None:
        """Invalidate the issued access token, as Label Studio does when it expires."""
        self.access_tokens.append("revoked")

    def authorized(self, hit: Hit) -> bool:
        header = hit.headers.get("authorization", "")
        if self.pat is None:
            return header == f"Token {LEGACY_KEY}"
        return bool(self.access_tokens) and header == f"Bearer {self.access_tokens[-1]}"

    def __call__(self, hit: Hit) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(hit.path)
        if url.path == "/api/token/refresh/" and hit.method == "POST":
            if json.loads(hit.body).get("refresh") != self.pat:
                return 401, {}, b'{"detail": "invalid"}'
            token = jwt({"token_type": "access", "exp": 4102444800, "n": len(self.access_tokens)})
            self.access_tokens.append(token)
            return 200, {"Content-Type": "application/json"}, json.dumps({"access": token}).encode()
        if not self.authorized(hit):
            return 401, {}, b'{"detail": "Authentication credentials were not provided."}'
        if url.path.startswith("/storage-data/uploaded/"):
            return 404, {}, b"not here"  # FileSystemStorage behind nginx: the legacy path serves it
        if url.path.startswith("/data/upload/1/"):
            return image_response(self.image)
        if url.path == "/tasks/7/presign/":
            fileuri = base64.urlsafe_b64decode(parse_qs(url.query)["fileuri"][0]).decode()
            assert fileuri == "s3://bucket/cat.png"
            return 303, {"Location": f"{self.other_base}/bucket/cat.png?X-Amz-Signature=abc"}, b""
        return 404, {}, b""


# ---------------------------------------------------------------------------- decoding


def test_data_uri_png_and_content_hash_of_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    images = loader()
    as_png = images.load(task(data_uri(encode(Image.fromarray(pixels)))), "image")
    as_bmp = images.load(task(data_uri(encode(Image.fromarray(pixels), "BMP"), "image/bmp")), "image")

    assert (as_png.width, as_png.height, as_png.image.mode) == (50, 30, "RGB")
    assert np.array_equal(np.asarray(as_png.image), pixels)
    assert as_png.source == f"data:image/png ({len(encode(Image.fromarray(pixels)))} bytes)"
    # the hash is of the pixels: the same picture in another file format hits the same cache entry
    assert as_png.sha256 == as_bmp.sha256 and len(as_png.sha256) == 64
    other = images.load(task(data_uri(sample_png(50, 30))), "image")
    assert other.sha256 != as_png.sha256


def test_exif_orientation_6_gives_the_displayed_size_and_orientation() -> None:
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:, :30] = (255, 0, 0)  # left half red
    stored[:, 30:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    jpeg = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    loaded = loader().load(task(data_uri(jpeg, "image/jpeg")), "image")

    assert (loaded.width, loaded.height) == (40, 60)
    shown = np.asarray(loaded.image).astype(int)
    assert shown[:25, :, 0].mean() > 200 and shown[:25, :, 2].mean() < 50  # what was left is on top
    assert shown[35:, :, 2].mean() > 200 and shown[35:, :, 0].mean() < 50


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 1000, 32768, 65535, 12850]], dtype=np.uint16)
    png = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    loaded = loader().load(task(data_uri(png)), "image")
    assert np.array_equal(np.asarray(loaded.image)[0, :, 0], [0, 1, 4, 128, 255, 50])
    assert np.array_equal(np.asarray(loaded.image)[..., 0], np.asarray(loaded.image)[..., 2])


def test_palette_la_rgba_cmyk_int_and_float_images_become_rgb() -> None:
    images = loader()

    def load(image: Image.Image, fmt: str = "PNG") -> np.ndarray:
        loaded = images.load(task(data_uri(encode(image, fmt))), "image")
        assert loaded.image.mode == "RGB" and loaded.image.size == image.size
        return np.asarray(loaded.image)

    palette = Image.new("P", (4, 3))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    got = load(palette)
    assert tuple(got[0, 0]) == (10, 20, 30) and tuple(got[1, 1]) == (200, 100, 50)

    assert tuple(load(Image.new("LA", (5, 4), (77, 0)))[2, 2]) == (77, 77, 77)
    assert tuple(load(Image.new("RGBA", (5, 4), (1, 2, 3, 0)))[0, 0]) == (1, 2, 3)
    assert tuple(load(Image.new("CMYK", (5, 4), (0, 255, 255, 0)), "TIFF")[0, 0]) == (255, 0, 0)

    wide = Image.fromarray(np.array([[-1000, 0, 3000]], dtype=np.int32))
    assert wide.mode == "I"
    assert load(wide, "TIFF")[0, :, 0].tolist() == [0, 64, 255]  # stretched min..max
    fraction = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert load(fraction, "TIFF")[0, :, 0].tolist() == [0, 128, 255]


def test_corrupt_and_non_image_bytes_are_clear_errors() -> None:
    with pytest.raises(ImageLoadError, match=r"task 1 data\['image'\].*not an image Pillow can read"):
        loader().load(task(data_uri(b"<html>nope</html>", "text/html")), "image")
    truncated = sample_png(64, 64)[:200]
    with pytest.raises(ImageLoadError, match="corrupt or truncated PNG"):
        loader().load(task(data_uri(truncated)), "image")
    with pytest.raises(ImageLoadError, match="not valid base64"):
        loader().load(task("data:image/png;base64,***"), "image")


def test_missing_or_non_string_value_names_the_key() -> None:
    with pytest.raises(ImageLoadError, match=r"task 3 data\['photo'\] holds no image reference"):
        loader().load({"id": 3, "data": {"image": "x"}}, "photo")
    with pytest.raises(ImageLoadError, match="holds no image reference"):
        loader().load({"id": 3, "data": {"image": 5}}, "image")


# ---------------------------------------------------------------------------- limits


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but holds one row: a decompression bomb stand-in."""
    png = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


def test_pixel_limits_are_checked_from_the_header_before_decoding() -> None:
    with pytest.raises(ImageLoadError, match=r"200x100 = 20000 pixels, over MAX_IMAGE_PIXELS=10000"):
        loader(max_image_pixels=10_000).load(task(data_uri(sample_png(200, 100))), "image")
    # 64 Mpx claimed, 1 pixel of data: refused by the header check, not reported as truncated
    with pytest.raises(ImageLoadError, match="8000x8000 = 64000000 pixels, over MAX_IMAGE_PIXELS"):
        loader().load(task(data_uri(_png_claiming(8000, 8000))), "image")
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        loader().load(task(data_uri(_png_claiming(100_000, 100_000))), "image")


def test_over_size_bytes_are_refused_from_any_source(serve, tmp_path: Path) -> None:
    payload = sample_png(100, 100)
    assert len(payload) > 20_000
    limit = 10_000
    with pytest.raises(ImageLoadError, match="over MAX_IMAGE_BYTES=10000"):
        loader(max_image_bytes=limit).load(task(data_uri(payload)), "image")

    def respond(hit: Hit) -> tuple[int, dict[str, str], bytes]:
        if hit.path == "/streamed.png":  # no Content-Length: the limit must hold while streaming
            return 200, {"no-length": "1", "Connection": "close"}, payload
        return image_response(payload)

    base, hits = serve(respond)
    images = loader(max_image_bytes=limit, allowed_image_hosts="127.0.0.1")
    with pytest.raises(ImageLoadError, match="is .* bytes, over MAX_IMAGE_BYTES=10000"):
        images.load(task(f"{base}/declared.png"), "image")
    with pytest.raises(ImageLoadError, match="sent more than MAX_IMAGE_BYTES=10000"):
        images.load(task(f"{base}/streamed.png"), "image")

    (tmp_path / "big.png").write_bytes(payload)
    files = loader(max_image_bytes=limit, allow_local_files=True, local_files_root=str(tmp_path))
    with pytest.raises(ImageLoadError, match="over MAX_IMAGE_BYTES=10000"):
        files.load(task("big.png"), "image")


# ---------------------------------------------------------------------------- Label Studio


def test_label_studio_upload_gets_the_token_and_falls_back_to_the_legacy_path(serve) -> None:
    fake = FakeLabelStudio()
    ls_url, hits = serve(fake)
    loaded = loader(label_studio_url=ls_url, label_studio_api_key=LEGACY_KEY).load(
        task("/data/upload/1/cat.png"), "image"
    )
    assert np.array_equal(np.asarray(loaded.image), np.asarray(Image.open(io.BytesIO(fake.image))))
    assert [h.path for h in hits] == [
        "/storage-data/uploaded/?filepath=upload/1/cat.png",
        "/data/upload/1/cat.png",
    ]
    assert all(h.headers["authorization"] == f"Token {LEGACY_KEY}" for h in hits)
    assert loaded.source == f"{ls_url}/data/upload/1/cat.png"


def test_setup_hostname_and_token_are_used_when_no_url_is_configured(serve) -> None:
    fake = FakeLabelStudio()
    ls_url, hits = serve(fake)
    # a Label Studio on loopback: allow-listed, as a user must (the /setup hostname is no exemption)
    images = loader(allowed_image_hosts="127.0.0.1")
    loaded = images.load(task("upload/1/cat.png"), "image", hostname=ls_url, access_token=LEGACY_KEY)
    assert loaded.width == 48 and hits[-1].headers["authorization"] == f"Token {LEGACY_KEY}"


def test_setup_hostname_is_no_exemption_from_the_ssrf_guard(serve) -> None:
    # Anyone reaching the backend can post /setup: its hostname must not open loopback to them.
    fake = FakeLabelStudio()
    ls_url, hits = serve(fake)
    secret_url, secret_hits = serve(lambda hit: image_response(sample_png()))
    images = loader()
    for value in ("/data/upload/1/cat.png", f"{ls_url}/data/upload/1/cat.png", f"{secret_url}/secret.png"):
        with pytest.raises(ImageLoadError, match=r"127.0.0.1 \(not public: loopback\)") as refused:
            images.load(task(value), "image", hostname=ls_url, access_token=LEGACY_KEY)
        if not value.startswith(secret_url):
            assert "sent to /setup is not trusted" in str(refused.value)
            assert "set LABEL_STUDIO_URL to this Label Studio or add 127.0.0.1 to ALLOWED_IMAGE_HOSTS" in str(
                refused.value
            )
    assert hits == [] and secret_hits == []
    # the operator's LABEL_STUDIO_URL is exempt, with the /setup token when no key is set
    configured = loader(label_studio_url=ls_url)
    assert configured.load(task("/data/upload/1/cat.png"), "image", access_token=LEGACY_KEY).width == 48


def test_operator_key_never_goes_to_a_hostname_named_in_a_request(serve) -> None:
    ls_url, hits = serve(FakeLabelStudio())
    with pytest.raises(ImageLoadError, match="needs a Label Studio API token"):
        loader(label_studio_api_key=LEGACY_KEY).load(task("/data/upload/1/cat.png"), "image", hostname=ls_url)
    assert hits == []


def test_label_studio_path_without_a_known_host_is_a_clear_error() -> None:
    with pytest.raises(ImageLoadError, match="no Label Studio URL is known: set LABEL_STUDIO_URL"):
        loader().load(task("/data/upload/1/cat.png"), "image")


def test_token_is_not_sent_to_other_hosts(serve) -> None:
    other_url, other_hits = serve(lambda hit: image_response(sample_png()))
    fake = FakeLabelStudio(other_base=other_url)
    ls_url, ls_hits = serve(fake)
    images = loader(label_studio_url=ls_url, label_studio_api_key=LEGACY_KEY, allowed_image_hosts="127.0.0.1")

    images.load(task(f"{other_url}/direct.png"), "image")
    # a cloud URI: presigned by Label Studio (with the token), then the bucket (without it)
    images.load(task("s3://bucket/cat.png", task_id=7), "image")

    assert [h.path for h in other_hits] == ["/direct.png", "/bucket/cat.png?X-Amz-Signature=abc"]
    assert all("authorization" not in h.headers for h in other_hits)
    assert ls_hits[0].path.startswith("/tasks/7/presign/?fileuri=")
    assert ls_hits[0].headers["authorization"] == f"Token {LEGACY_KEY}"


def test_cloud_uri_needs_the_task_id(serve) -> None:
    ls_url, hits = serve(FakeLabelStudio())
    with pytest.raises(ImageLoadError, match="needs the task id"):
        loader(label_studio_url=ls_url, label_studio_api_key=LEGACY_KEY).load(
            {"data": {"image": "gs://bucket/cat.png"}}, "image"
        )
    assert hits == []


def test_personal_access_token_is_exchanged_cached_and_refreshed_on_401(serve) -> None:
    pat = jwt({"token_type": "refresh", "exp": 4102444800})
    fake = FakeLabelStudio(pat=pat)
    ls_url, hits = serve(fake)
    images = loader(label_studio_url=ls_url, label_studio_api_key=pat)

    def exchanges() -> int:
        return sum(h.path == "/api/token/refresh/" for h in hits)

    images.load(task("/data/upload/1/a.png"), "image")
    assert exchanges() == 1
    assert json.loads(hits[0].body) == {"refresh": pat}
    assert hits[-1].headers["authorization"] == f"Bearer {fake.access_tokens[0]}"

    images.load(task("/data/upload/1/b.png"), "image")
    assert exchanges() == 1  # the access token is cached

    fake.rotate_access_token()
    images.load(task("/data/upload/1/c.png"), "image")
    assert exchanges() == 2
    assert hits[-1].headers["authorization"] == f"Bearer {fake.access_tokens[-1]}"
    assert all(pat not in h.headers.get("authorization", "") for h in hits)  # the PAT itself is never sent


def test_rejected_personal_access_token_is_a_clear_error(serve) -> None:
    fake = FakeLabelStudio(pat=jwt({"token_type": "refresh"}))
    ls_url, hits = serve(fake)
    wrong = jwt({"token_type": "refresh", "user": "someone else"})
    refusing = loader(label_studio_url=ls_url, label_studio_api_key=wrong)
    for name in ("a.png", "b.png"):
        with pytest.raises(ImageLoadError, match=r"refused the personal access token .* \(HTTP 401: invalid\)"):
            refusing.load(task(f"/data/upload/1/{name}"), "image")
    exchanges = [h for h in hits if h.path == "/api/token/refresh/"]
    assert len(exchanges) == 1, "a refused token is neither retried on the next URL nor on the next task"


# ---------------------------------------------------------------------------- SSRF guard


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("0.0.0.0", "unspecified"),
    ],
)
def test_loopback_is_refused_unless_it_is_the_label_studio_host(serve, host: str, reason: str) -> None:
    base, hits = serve(lambda hit: image_response(sample_png()))
    port = urlsplit(base).port
    images = loader(label_studio_url="http://ls.invalid:8080", label_studio_api_key=LEGACY_KEY)
    with pytest.raises(ImageLoadError, match=rf"refused to fetch .* \(not public: {reason}"):
        images.load(task(f"http://{host}:{port}/img.png"), "image")
    assert hits == []


def test_metadata_address_is_refused_even_when_allow_listed() -> None:
    images = loader(allowed_image_hosts="169.254.0.0/16,169.254.169.254")
    with pytest.raises(ImageLoadError, match=r"169.254.169.254 \(cloud metadata address\)"):
        images.load(task("http://169.254.169.254/latest/meta-data/"), "image")


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64
        "2002:a9fe:a9fe::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254 (stored inverted)
    ],
)
def test_metadata_address_in_ipv6_forms_is_refused_even_when_allow_listed(monkeypatch, address: str) -> None:
    fake_dns(monkeypatch, {"images.example": address})
    images = loader(allowed_image_hosts=f"images.example,{address}")
    with pytest.raises(ImageLoadError, match=r"\(cloud metadata address\)"):
        images.load(task("http://images.example/latest/meta-data/"), "image")


def test_names_resolving_to_private_addresses_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"intranet.example": "10.1.2.3", "v6.example": "fd12::1"})
    with pytest.raises(ImageLoadError, match=r"intranet.example resolves to 10.1.2.3 \(not public: private\)"):
        loader().load(task("http://intranet.example/cat.png"), "image")
    with pytest.raises(ImageLoadError, match=r"fd12::1 \(not public: private\)"):
        loader().load(task("https://v6.example/cat.png"), "image")


def test_redirect_from_an_allowed_host_to_a_private_one_is_refused(serve, monkeypatch) -> None:
    private_url, private_hits = serve(lambda hit: image_response(sample_png()))
    allowed_url, allowed_hits = serve(lambda hit: (302, {"Location": f"{private_url}/secret.png"}, b""))
    fake_dns(monkeypatch, {"images.example": "127.0.0.1"})
    url = f"http://images.example:{urlsplit(allowed_url).port}/cat.png"
    with pytest.raises(ImageLoadError, match=r"refused to fetch http://127.0.0.1:\d+/secret.png"):
        loader(allowed_image_hosts="images.example").load(task(url), "image")
    assert [h.path for h in allowed_hits] == ["/cat.png"]
    assert private_hits == []


def test_allow_listed_host_is_fetched_at_the_checked_address_with_its_name(serve, monkeypatch) -> None:
    base, hits = serve(lambda hit: image_response(sample_png()))
    port = urlsplit(base).port
    fake_dns(monkeypatch, {"images.example": "127.0.0.1"})
    loaded = loader(allowed_image_hosts="Images.Example").load(task(f"http://images.example:{port}/a.png"), "image")
    assert loaded.width == 48
    assert hits[0].headers["host"] == f"images.example:{port}"
    assert loaded.source == f"http://images.example:{port}/a.png"
    assert loader(allowed_image_hosts="127.0.0.0/8").load(task(f"{base}/b.png"), "image").width == 48


def test_redirects_are_bounded(serve) -> None:
    base, hits = serve(lambda hit: (302, {"Location": "/loop"}, b""))
    with pytest.raises(ImageLoadError, match="more than 5 redirects"):
        loader(allowed_image_hosts="127.0.0.1").load(task(f"{base}/loop"), "image")
    assert len(hits) == 6


# ---------------------------------------------------------------------------- retries and caches


def test_transient_errors_are_retried_and_permanent_ones_are_not(serve) -> None:
    answers = {"/flaky.png": [503, 429, 200], "/down.png": [503, 503, 503, 200], "/gone.png": [404, 200]}

    def respond(hit: Hit) -> tuple[int, dict[str, str], bytes]:
        status = answers[hit.path].pop(0)
        return (status, {"Retry-After": "0"}, b"") if status != 200 else image_response(sample_png())

    base, hits = serve(respond)
    images = loader(allowed_image_hosts="127.0.0.1")
    assert images.load(task(f"{base}/flaky.png"), "image").width == 48
    with pytest.raises(ImageLoadError, match=r"answered HTTP 503 \(gave up after 3 tries\)"):
        images.load(task(f"{base}/down.png"), "image")
    with pytest.raises(ImageLoadError, match="answered HTTP 404"):
        images.load(task(f"{base}/gone.png"), "image")
    assert [h.path for h in hits].count("/flaky.png") == 3
    assert [h.path for h in hits].count("/down.png") == 3
    assert [h.path for h in hits].count("/gone.png") == 1


def test_retries_back_off_exponentially_and_obey_a_bounded_retry_after(serve, monkeypatch) -> None:
    # A busy Label Studio (or bucket) must not be hammered: the waits themselves are the behaviour.
    answers = {
        "/backoff.png": [(503, {}), (502, {}), (200, {})],
        "/told.png": [(429, {"Retry-After": "2"}), (200, {})],
        "/greedy.png": [(503, {"Retry-After": "3600"}), (200, {})],
    }

    def respond(hit: Hit) -> tuple[int, dict[str, str], bytes]:
        status, headers = answers[hit.path].pop(0)
        return (status, headers, b"") if status != 200 else image_response(sample_png())

    waits: list[float] = []
    monkeypatch.setattr(images_module.time, "sleep", waits.append)
    base, hits = serve(respond)
    images = ImageLoader(Settings(allowed_image_hosts="127.0.0.1"), backoff_s=0.25)
    images.load(task(f"{base}/backoff.png"), "image")
    assert waits == [0.25, 0.5]
    images.load(task(f"{base}/told.png"), "image")
    assert waits[2:] == [2.0]
    images.load(task(f"{base}/greedy.png"), "image")
    assert waits[3:] == [images_module.MAX_RETRY_AFTER_S]
    assert len(hits) == 7


def test_downloads_are_cached_in_memory_and_on_disk(serve, tmp_path: Path) -> None:
    base, hits = serve(lambda hit: image_response(sample_png()))
    settings = {"allowed_image_hosts": "127.0.0.1", "image_cache_dir": str(tmp_path / "cache")}
    first = loader(**settings)
    a = first.load(task(f"{base}/a.png"), "image")
    first.load(task(f"{base}/a.png"), "image")
    assert len(hits) == 1  # memory

    b = loader(**settings).load(task(f"{base}/a.png"), "image")  # a fresh process: disk
    assert len(hits) == 1 and a.sha256 == b.sha256
    assert [p.name.startswith(".tmp") for p in (tmp_path / "cache").iterdir()] == [False]

    loader(allowed_image_hosts="127.0.0.1").load(task(f"{base}/a.png"), "image")
    assert len(hits) == 2  # no cache configured, fresh memory


def test_a_corrupt_disk_cache_entry_is_downloaded_again_and_warned_about_once(serve, tmp_path, caplog) -> None:
    base, hits = serve(lambda hit: image_response(sample_png()))
    cache = tmp_path / "cache"
    cache.mkdir()
    urls = [f"{base}/a.png", f"{base}/b.png"]
    for url in urls:  # what a crash or a damaged disk leaves: bytes that no longer decode
        (cache / hashlib.sha256(url.encode()).hexdigest()).write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    images = loader(allowed_image_hosts="127.0.0.1", image_cache_dir=str(cache))
    with caplog.at_level(logging.DEBUG, logger="backend.images"):
        assert [images.load(task(url), "image").width for url in urls] == [48, 48]
    assert [h.path for h in hits] == ["/a.png", "/b.png"]
    assert all((cache / hashlib.sha256(url.encode()).hexdigest()).read_bytes() == sample_png() for url in urls)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not decode" in warnings[0].getMessage()
    assert loader(allowed_image_hosts="127.0.0.1", image_cache_dir=str(cache)).load(task(urls[0]), "image")
    assert len(hits) == 2  # the repaired entry serves a fresh process


def test_bytes_are_cached_only_once_they_decode(serve, tmp_path: Path) -> None:
    answers = [b"<html>login</html>", sample_png()]
    base, hits = serve(lambda hit: image_response(answers.pop(0)))
    images = loader(allowed_image_hosts="127.0.0.1", image_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ImageLoadError, match="not an image Pillow can read"):
        images.load(task(f"{base}/a.png"), "image")
    assert images.load(task(f"{base}/a.png"), "image").width == 48
    assert len(hits) == 2


def test_disk_cache_read_and_write_failures_are_warned_about_once(serve, tmp_path, caplog) -> None:
    base, hits = serve(lambda hit: image_response(sample_png()))
    cache = tmp_path / "cache"
    urls = [f"{base}/{name}.png" for name in "abc"]
    for url in urls:  # a directory where the entry belongs: reading and replacing it both fail
        (cache / hashlib.sha256(url.encode()).hexdigest()).mkdir(parents=True)
    images = loader(allowed_image_hosts="127.0.0.1", image_cache_dir=str(cache))
    with caplog.at_level(logging.DEBUG, logger="backend.images"):
        assert all(images.load(task(url), "image").width == 48 for url in urls)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "image cache read failed" in warnings[0] and "image cache write failed" in warnings[1]
    assert sum("image cache write failed" in r.getMessage() for r in caplog.records) == 3  # the rest: debug
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]  # no partial files left behind
    assert len(hits) == 3


# ---------------------------------------------------------------------------- download deadline


@contextmanager
def dripping_headers(interval_s: float = 0.05) -> Iterator[tuple[str, list[float]]]:
    """A server that answers a status line, then one header line per ``interval_s`` forever:
    every read is quick, the header block never ends. Yields its URL and, per connection, the
    seconds until the client closed it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    closed_after: list[float] = []

    def drip(connection: socket.socket) -> None:
        started = time.monotonic()
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(interval_s):
                    connection.sendall(b"X-Drip: x\r\n")
            except OSError:  # the client closed the connection
                closed_after.append(time.monotonic() - started)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", closed_after
    finally:
        stop.set()
        listener.close()


def test_a_server_dripping_headers_is_cut_at_the_download_deadline() -> None:
    images = loader(allowed_image_hosts="127.0.0.1", download_timeout_s=0.5)
    outcome: list[BaseException] = []
    with dripping_headers() as (base, closed_after):

        def load() -> None:
            try:
                images.load(task(f"{base}/a.png"), "image")
            except BaseException as exc:  # the test reports whatever ended the load
                outcome.append(exc)

        started = time.monotonic()
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(5.0)  # bounded: without the deadline the load waits for the headers forever
        elapsed = time.monotonic() - started
        assert not worker.is_alive(), "the load was still waiting for the header block after 5 s"
        noticed_by = time.monotonic() + 2.0  # the server notices a close at its next drip or two
        while len(closed_after) < 3 and time.monotonic() < noticed_by:
            time.sleep(0.05)
    [error] = outcome
    assert isinstance(error, ImageLoadError)
    assert "no complete response within DOWNLOAD_TIMEOUT_S=0.5" in str(error)
    assert "gave up after 3 tries" in str(error)
    # three attempts of 0.5 s (plus 10 + 20 ms back-off), each connection closed at its deadline
    assert 1.5 <= elapsed < 3.0
    assert len(closed_after) == 3 and all(0.45 < t < 1.5 for t in closed_after), closed_after


def test_a_load_deadline_cuts_the_attempt_and_skips_the_retries() -> None:
    """One image could take MAX_TRIES x DOWNLOAD_TIMEOUT_S plus back-off; a request's time budget
    is what it may really take."""
    images = loader(allowed_image_hosts="127.0.0.1", download_timeout_s=5.0)
    with dripping_headers() as (base, closed_after):
        started = time.monotonic()
        with pytest.raises(ImageLoadError) as caught:
            images.load(task(f"{base}/a.png"), "image", deadline=started + 0.5)
        elapsed = time.monotonic() - started
        noticed_by = time.monotonic() + 2.0
        while not closed_after and time.monotonic() < noticed_by:
            time.sleep(0.05)
    message = str(caught.value)
    assert "not downloaded within the request's time budget (PREDICT_TIME_BUDGET_S=75)" in message
    assert "no complete response within DOWNLOAD_TIMEOUT_S" in message  # the last try's error
    assert "gave up after" not in message
    assert 0.45 < elapsed < 2.0
    assert len(closed_after) == 1  # no second attempt after the deadline


def test_a_back_off_that_would_end_past_the_deadline_is_not_slept(serve, monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(images_module.time, "sleep", waits.append)
    base, hits = serve(lambda hit: (503, {"Retry-After": "5"}, b""))
    images = loader(allowed_image_hosts="127.0.0.1")
    with pytest.raises(ImageLoadError, match=r"time budget .*; last try: .* answered HTTP 503"):
        images.load(task(f"{base}/busy.png"), "image", deadline=time.monotonic() + 2.0)
    assert waits == [] and len(hits) == 1
    # a wait that fits is still made, and so is the retry after it
    with pytest.raises(ImageLoadError, match="gave up after 3 tries"):
        images.load(task(f"{base}/busy.png"), "image", deadline=time.monotonic() + 60.0)
    assert waits == [5.0, 5.0] and len(hits) == 4


def test_a_passed_deadline_opens_no_connection_but_needs_none_for_inline_images(serve) -> None:
    base, hits = serve(lambda hit: image_response(sample_png()))
    images = loader(allowed_image_hosts="127.0.0.1")
    past = time.monotonic() - 1.0
    with pytest.raises(ImageLoadError, match="not downloaded within the request's time budget"):
        images.load(task(f"{base}/a.png"), "image", deadline=past)
    assert hits == []
    assert images.load(task(data_uri(sample_png())), "image", deadline=past).width == 48


def test_load_deadline_bounds_the_loads_made_inside_it(serve) -> None:
    """How /predict bounds the loads it makes through the Predictor, which passes no deadline."""
    base, hits = serve(lambda hit: image_response(sample_png()))
    images = loader(allowed_image_hosts="127.0.0.1")
    with images_module.load_deadline(time.monotonic() - 1.0), pytest.raises(ImageLoadError, match="time budget"):
        images.load(task(f"{base}/a.png"), "image")
    assert hits == []
    assert images.load(task(f"{base}/a.png"), "image").width == 48  # unbounded again after the block
    with images_module.load_deadline(time.monotonic() - 1.0):  # an explicit deadline wins
        assert images.load(task(f"{base}/b.png"), "image", deadline=time.monotonic() + 30).width == 48
    assert len(hits) == 2


# ---------------------------------------------------------------------------- local files


def test_local_files_only_when_enabled_and_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(sample_png(20, 10))
    (tmp_path / "secret.png").write_bytes(sample_png(30, 10))
    os.symlink(tmp_path / "secret.png", root / "link.png")

    with pytest.raises(ImageLoadError, match="local file paths are refused: set ALLOW_LOCAL_FILES"):
        loader(local_files_root=str(root)).load(task(str(root / "sub" / "cat.png")), "image")

    images = loader(allow_local_files=True, local_files_root=str(root))
    assert images.load(task(str(root / "sub" / "cat.png")), "image").width == 20
    assert images.load(task("sub/cat.png"), "image").width == 20
    assert images.load(task(f"file://{root}/sub/cat.png"), "image").width == 20
    # Label Studio's Local Storage URL is read from disk, no Label Studio needed
    local = images.load(task("/data/local-files/?d=sub/cat.png"), "image")
    assert local.width == 20 and local.source == str(root / "sub" / "cat.png")
    for outside in [
        "../secret.png",
        str(tmp_path / "secret.png"),
        "link.png",
        "/data/local-files/?d=../secret.png",
    ]:
        with pytest.raises(ImageLoadError, match="outside LOCAL_FILES_ROOT"):
            images.load(task(outside), "image")
    with pytest.raises(ImageLoadError, match="no such file under LOCAL_FILES_ROOT"):
        images.load(task("sub/dog.png"), "image")
    with pytest.raises(ImageLoadError, match="LOCAL_FILES_ROOT is not set"):
        loader(allow_local_files=True).load(task("sub/cat.png"), "image")


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_is_pinned_to_the_checked_address_and_verifies_the_name(serve, monkeypatch, tmp_path) -> None:
    cert, key = _self_signed(tmp_path, "images.example")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    base, hits = serve(lambda hit: image_response(sample_png()), tls=tls)
    port = urlsplit(base).port
    fake_dns(monkeypatch, {"images.example": "127.0.0.1", "other.example": "127.0.0.1"})
    monkeypatch.setattr(images_module, "ca_bundle_path", lambda: str(cert))
    images = loader(allowed_image_hosts="images.example,other.example")

    assert images.load(task(f"https://images.example:{port}/a.png"), "image").width == 48
    assert hits[0].headers["host"] == f"images.example:{port}"
    # the certificate is checked against the URL's name, not the address connected to
    with pytest.raises(ImageLoadError, match="other.example"):
        images.load(task(f"https://other.example:{port}/a.png"), "image")
    assert len(hits) == 1


def test_the_same_bytes_are_decoded_once_and_a_new_image_again(monkeypatch) -> None:
    """Clicks reload their task's image: the second load reuses the decoded image and its pixel
    hash (decode + EXIF + hash were 6-8 ms of a click), other bytes are decoded anew."""
    loader = ImageLoader(Settings())
    decodes: list[int] = []
    original = loader._decode

    def counted(raw: bytes):
        decodes.append(len(raw))
        return original(raw)

    monkeypatch.setattr(loader, "_decode", counted)
    first = loader.load({"id": 1, "data": {"image": data_uri(png_bytes(40, 30))}}, "image")
    again = loader.load({"id": 2, "data": {"image": data_uri(png_bytes(40, 30))}}, "image")
    other = loader.load({"id": 3, "data": {"image": data_uri(png_bytes(40, 30, (1, 2, 3)))}}, "image")
    assert len(decodes) == 2
    assert again.image is first.image and again.sha256 == first.sha256 == pixel_sha256(first.image)
    assert other.sha256 != first.sha256


def test_decoded_images_stay_within_their_memory_budget() -> None:
    loader = ImageLoader(Settings(), decoded_cache_bytes=40 * 30 * 3 * 2)  # room for two
    tasks = [{"id": i, "data": {"image": data_uri(png_bytes(40, 30, (i, 0, 0)))}} for i in range(3)]
    images = [loader.load(task, "image").image for task in tasks]
    assert loader.load(tasks[2], "image").image is images[2]  # recent ones stay
    assert loader.load(tasks[0], "image").image is not images[0]  # the oldest was evicted
