"""Image-embedding cache: a byte-bounded in-memory LRU with an optional bounded disk tier.

SAM's image encoder is the expensive part of a click (hundreds of milliseconds to seconds);
the prompt decoder is a few milliseconds. Caching the embedding by image content and
segmenter id makes every click after the first one cheap, and lets pre-annotation warm the
cache for the annotator's first click. The disk tier keeps that warmth across restarts and
between worker processes that share a directory.

Design points, each because of a failure seen in practice:

* Bounded in bytes, not entries: embeddings differ in size between SAM variants
  (ViT-B/H, SAM-HQ carries extra tensors), so an entry count says nothing about memory.
* Single-flight: Label Studio fires several requests for one task at once (prediction,
  the first click); they must not all run the encoder for the same image.
* Stored on CPU: a cache on the GPU would hold accelerator memory the models need, and
  ``torch.save`` of CUDA tensors cannot be loaded on a CPU-only worker. The segmenter moves
  the tensors to its device when it uses them.
* The disk tier never breaks serving: a truncated file, a full disk or a read-only
  directory is logged once and the cache carries on from memory.

Cached embeddings are shared between callers: treat them as read-only.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backend.models.base import ImageEmbedding

if TYPE_CHECKING:
    from backend.config import Settings

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
_GIB = 1024 * _MIB
_FILE_SUFFIX = ".pt"
_TMP_SUFFIX = ".tmp"
# A writer that crashed between mkstemp and os.replace leaves its temp file behind; one that
# is this old cannot belong to a live writer (a write takes well under a second).
_STALE_TMP_S = 3600.0
# Bumped when the on-disk layout changes, so old files read as stale instead of wrong.
_FORMAT_VERSION = 1
_NDARRAY_TAG = "__ndarray__"


def cache_key(image_sha256: str, model_id: str) -> str:
    """The key of one image's embedding under one segmenter.

    The content hash (not the URL) is used because the same upload is reachable under
    several URLs and one URL can change content. ``model_id`` must name everything that
    changes the embedding (checkpoint and dtype), so two segmenters never share entries.
    """
    if not image_sha256 or not model_id:
        raise ValueError("cache_key needs a non-empty image hash and model id")
    return f"{model_id}@{image_sha256}"


def _to_cpu(value: Any) -> Any:
    """Detach ``value`` onto the CPU, copying views so the entry owns exactly what it reports.

    A slice of a batched encoder output would otherwise pin the whole batch's storage while
    ``ImageEmbedding.nbytes`` charges only for the slice, and ``torch.save`` would write the
    whole storage to disk.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.untyped_storage().nbytes() > tensor.element_size() * tensor.nelement():
            tensor = tensor.clone()
        return tensor
    if isinstance(value, np.ndarray):
        return value if value.flags.owndata else value.copy()
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _cpu_embedding(embedding: ImageEmbedding) -> ImageEmbedding:
    """A copy of ``embedding`` whose tensors all live on the CPU (no copy for CPU tensors)."""
    return ImageEmbedding(
        model_id=embedding.model_id,
        image_size=tuple(embedding.image_size),
        tensors={name: _to_cpu(value) for name, value in embedding.tensors.items()},
    )


def _encode(value: Any) -> Any:
    """Make ``value`` loadable with ``torch.load(weights_only=True)``.

    ``weights_only`` refuses arbitrary pickles (a shared cache directory must not be a code
    execution path), and numpy arrays are pickles, so they travel as tagged tensors.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return {_NDARRAY_TAG: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, list | tuple):
        return type(value)(_encode(item) for item in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot persist a {type(value).__name__} in the embedding disk cache")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_NDARRAY_TAG}:
        return value[_NDARRAY_TAG].numpy()
    if isinstance(value, list | tuple):
        return type(value)(_decode(item) for item in value)
    return value


class EmbeddingCache:
    """Thread-safe embedding cache; see the module docstring for why it is shaped this way.

    Counters (``hits``, ``misses``, ``disk_hits``, ``computes``, ``evictions``,
    ``disk_evictions``, ``disk_errors``) are plain attributes, also returned by
    :meth:`stats`. A request that waited on another request's computation counts as a hit:
    it was served without running the encoder.
    """

    def __init__(
        self,
        max_bytes: int,
        disk_dir: str | None = None,
        disk_max_bytes: int = 10 * _GIB,
        disk_namespace: str = "",
    ) -> None:
        """``disk_namespace`` names what besides the key changes an embedding (device and
        dtype): processes sharing a disk tier under other ones never read each other's files."""
        if max_bytes < 0 or disk_max_bytes < 0:
            raise ValueError("embedding cache sizes must be >= 0")
        self.max_bytes = max_bytes
        self.disk_dir = disk_dir or None
        self.disk_max_bytes = disk_max_bytes
        self.disk_namespace = disk_namespace
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[ImageEmbedding, int]] = OrderedDict()
        self._bytes = 0
        self._in_flight: dict[str, Future[ImageEmbedding]] = {}
        self._corrupt_logged: set[str] = set()
        self._write_error_logged = False
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self.computes = 0
        self.evictions = 0
        self.disk_evictions = 0
        self.disk_errors = 0
        if self.disk_dir is not None:
            try:
                os.makedirs(self.disk_dir, exist_ok=True)
            except OSError as exc:
                self._disk_write_failed(exc)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingCache:
        """Build the cache from ``EMBEDDING_CACHE_MB`` / ``_DIR`` / ``_GB`` (MiB and GiB), its
        disk tier namespaced by the device and dtype the models will run in."""
        from backend.models.loading import resolve_device, resolve_dtype

        device = resolve_device(settings.device)
        return cls(
            max_bytes=settings.embedding_cache_mb * _MIB,
            disk_dir=settings.embedding_cache_dir or None,
            disk_max_bytes=int(settings.embedding_cache_gb * _GIB),
            disk_namespace=f"{torch.device(device).type}/{resolve_dtype(settings.dtype, device)}",
        )

    # ------------------------------------------------------------------ public API

    def get_or_compute(self, key: str, compute: Callable[[], ImageEmbedding]) -> ImageEmbedding:
        """The embedding for ``key``: from memory, else from disk, else from ``compute()``.

        Concurrent calls for one key run ``compute`` once; the others wait for it and get
        its result or its exception. A failure is not cached, so the next call retries.
        Calls for different keys never wait on each other's computations.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            flight = self._in_flight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._in_flight[key] = Future()
                self.misses += 1
        if not leader:
            embedding = flight.result()
            with self._lock:
                self.hits += 1
            return embedding
        return self._lead(key, compute, flight)

    def peek(self, key: str) -> ImageEmbedding | None:
        """The in-memory embedding for ``key`` or None, without touching disk, counters or
        LRU order: for asking "is this image warm?" without changing the answer."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        """Store an embedding computed elsewhere (e.g. by batched pre-annotation)."""
        stored = _cpu_embedding(embedding)
        with self._lock:
            self._remember(key, stored)
        self._write_disk(key, stored)

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters and the current memory use."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "disk_hits": self.disk_hits,
                "computes": self.computes,
                "evictions": self.evictions,
                "disk_evictions": self.disk_evictions,
                "disk_errors": self.disk_errors,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            }

    # ------------------------------------------------------------------ memory tier

    def _lead(
        self, key: str, compute: Callable[[], ImageEmbedding], flight: Future[ImageEmbedding]
    ) -> ImageEmbedding:
        """Fill ``key`` as the one caller responsible for it, then release the waiters."""
        try:
            embedding = self._read_disk(key)
            from_disk = embedding is not None
            if embedding is None:
                with self._lock:
                    self.computes += 1
                embedding = _cpu_embedding(compute())
        except BaseException as exc:
            with self._lock:
                del self._in_flight[key]
            flight.set_exception(exc)
            raise
        with self._lock:
            self._remember(key, embedding)
            del self._in_flight[key]
        flight.set_result(embedding)
        # After the waiters are released: they need the memory copy, not the file.
        if not from_disk:
            self._write_disk(key, embedding)
        return embedding

    def _remember(self, key: str, embedding: ImageEmbedding) -> None:
        """Insert under the lock and evict least recently used entries down to the budget.

        An entry larger than the whole budget is not kept: it would evict everything and
        then be evicted itself by the next insert.
        """
        size = embedding.nbytes
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.max_bytes:
            return
        self._entries[key] = (embedding, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
            self.evictions += 1

    # ------------------------------------------------------------------ disk tier

    def _path(self, key: str) -> str:
        assert self.disk_dir is not None
        # Hashed because keys carry model ids with '/' and ':'.
        digest = hashlib.sha256(f"{self.disk_namespace}|{key}".encode()).hexdigest()
        return os.path.join(self.disk_dir, digest + _FILE_SUFFIX)

    def _read_disk(self, key: str) -> ImageEmbedding | None:
        """The stored embedding, or None when absent or unreadable (the file is then removed,
        so a bad file costs one recompute, not one per request)."""
        if self.disk_dir is None:
            return None
        path = self._path(key)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != _FORMAT_VERSION or payload.get("key") != key:
                raise ValueError("entry has another format version or key")
            embedding = ImageEmbedding(
                model_id=payload["model_id"],
                image_size=tuple(payload["image_size"]),
                tensors={name: _decode(value) for name, value in payload["tensors"].items()},
            )
        except FileNotFoundError:
            return None
        except Exception as exc:  # torch.load raises many types on truncated/garbage files
            self._drop_corrupt(key, path, exc)
            return None
        try:
            os.utime(path)  # mtime is the disk tier's LRU clock
        except OSError:
            pass  # evicted by another process meanwhile: the embedding is already read
        with self._lock:
            self.disk_hits += 1
        return embedding

    def _drop_corrupt(self, key: str, path: str, exc: Exception) -> None:
        with self._lock:
            self.disk_errors += 1
            first = key not in self._corrupt_logged
            self._corrupt_logged.add(key)
        if first:
            logger.warning("embedding cache: ignoring unreadable %s for %s: %s", path, key, exc)
        try:
            os.remove(path)
        except OSError:
            pass  # already gone or read-only dir: the next read fails the same, cheap way

    def _write_disk(self, key: str, embedding: ImageEmbedding) -> None:
        """Persist atomically (temp file + ``os.replace``) so readers in other processes see
        either the whole entry or none, then trim the directory to its byte budget."""
        if self.disk_dir is None or embedding.nbytes > self.disk_max_bytes:
            return
        payload = {
            "format": _FORMAT_VERSION,
            "key": key,
            "model_id": embedding.model_id,
            "image_size": tuple(embedding.image_size),
        }
        tmp_path = None
        try:
            payload["tensors"] = {name: _encode(value) for name, value in embedding.tensors.items()}
            fd, tmp_path = tempfile.mkstemp(dir=self.disk_dir, prefix=".", suffix=_TMP_SUFFIX)
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
            os.replace(tmp_path, self._path(key))
            tmp_path = None
        except (OSError, TypeError, RuntimeError) as exc:
            # RuntimeError: torch.save reports a full disk as one on some paths.
            self._disk_write_failed(exc)
            return
        finally:
            if tmp_path is not None:
                try:
                    os.remove(tmp_path)
                except OSError:
                    pass  # nothing more to do; a stale temp file is swept by _trim_disk
        self._trim_disk()

    def _disk_write_failed(self, exc: BaseException) -> None:
        with self._lock:
            self.disk_errors += 1
            first = not self._write_error_logged
            self._write_error_logged = True
        if first:
            hint = " (disk full)" if getattr(exc, "errno", None) == errno.ENOSPC else ""
            logger.warning(
                "embedding cache: cannot write to %s%s, serving from memory only: %s",
                self.disk_dir,
                hint,
                exc,
            )

    def _trim_disk(self) -> None:
        """Delete the least recently used files until the directory fits its budget.

        The directory is scanned rather than tracked in memory because several worker
        processes may share it.
        """
        assert self.disk_dir is not None
        files: list[tuple[int, str, int]] = []
        total = 0
        now = time.time()
        try:
            with os.scandir(self.disk_dir) as entries:
                for entry in entries:
                    try:
                        info = entry.stat()
                    except OSError:
                        continue  # removed by another process during the scan
                    if entry.name.endswith(_FILE_SUFFIX):
                        files.append((info.st_mtime_ns, entry.path, info.st_size))
                        total += info.st_size
                    elif entry.name.endswith(_TMP_SUFFIX) and now - info.st_mtime > _STALE_TMP_S:
                        self._remove_quietly(entry.path)
        except OSError as exc:
            self._disk_write_failed(exc)
            return
        files.sort()
        for _, path, size in files:
            if total <= self.disk_max_bytes:
                break
            if self._remove_quietly(path):
                with self._lock:
                    self.disk_evictions += 1
            total -= size

    @staticmethod
    def _remove_quietly(path: str) -> bool:
        """Remove ``path``; False when another process removed it first (not an error)."""
        try:
            os.remove(path)
        except OSError:
            return False
        return True
