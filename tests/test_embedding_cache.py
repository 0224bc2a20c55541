"""Behaviour of the image-embedding cache: LRU by bytes, single-flight, disk tier."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.config import Settings
from backend.embedding_cache import EmbeddingCache, cache_key
from backend.models.base import ImageEmbedding


def make_embedding(nbytes: int = 400, fill: float = 1.0) -> ImageEmbedding:
    """A float32 embedding charged exactly ``nbytes`` by the cache."""
    assert nbytes % 4 == 0
    return ImageEmbedding(
        model_id="test/sam",
        image_size=(32, 48),
        tensors={"image_embeddings": torch.full((nbytes // 4,), fill, dtype=torch.float32)},
    )


def counting(embedding: ImageEmbedding) -> tuple[Callable[[], ImageEmbedding], list[int]]:
    calls: list[int] = []

    def compute() -> ImageEmbedding:
        calls.append(1)
        return embedding

    return compute, calls


def never() -> ImageEmbedding:
    raise AssertionError("compute must not run: the entry should have been cached")


def run_threads(target: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a thread hung"


def test_cache_key_separates_models_and_rejects_empty_parts() -> None:
    assert cache_key("abc", "facebook/sam-vit-base") != cache_key("abc", "facebook/sam-vit-huge")
    assert cache_key("abc", "m") != cache_key("abd", "m")
    with pytest.raises(ValueError):
        cache_key("", "m")


def test_miss_then_hit_computes_once() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    compute, calls = counting(make_embedding())
    first = cache.get_or_compute("a", compute)
    second = cache.get_or_compute("a", compute)
    assert second is first
    assert len(calls) == 1
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["computes"]) == (1, 1, 1)
    assert stats["bytes"] == 400


def test_eviction_is_least_recently_used_by_bytes() -> None:
    cache = EmbeddingCache(max_bytes=1000)  # room for two 400-byte entries, not three
    cache.put("a", make_embedding(400))
    cache.put("b", make_embedding(400))
    cache.get_or_compute("a", never)  # a is now more recent than b
    cache.put("c", make_embedding(400))
    assert cache.peek("b") is None
    assert cache.peek("a") is not None and cache.peek("c") is not None
    assert cache.evictions == 1
    assert cache.stats()["bytes"] == 800
    # One large entry pushes out as many old ones as its bytes need, oldest first.
    cache.put("d", make_embedding(800))
    assert [key for key in "acd" if cache.peek(key) is not None] == ["d"]
    assert cache.evictions == 3


def test_peek_does_not_change_lru_order() -> None:
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("a", make_embedding(400))
    cache.put("b", make_embedding(400))
    assert cache.peek("a") is not None
    cache.put("c", make_embedding(400))
    assert cache.peek("a") is None
    assert cache.stats()["hits"] == 0


def test_entry_larger_than_budget_is_returned_but_not_kept() -> None:
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("small", make_embedding(400))
    compute, calls = counting(make_embedding(2000))
    result = cache.get_or_compute("big", compute)
    assert result.nbytes == 2000
    assert cache.peek("big") is None
    assert cache.peek("small") is not None, "an oversized entry must not flush the cache"
    cache.get_or_compute("big", compute)
    assert len(calls) == 2
    assert cache.stats()["bytes"] == 400


def test_replacing_a_key_does_not_double_count_bytes() -> None:
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("a", make_embedding(400))
    cache.put("a", make_embedding(800))
    assert cache.stats()["bytes"] == 800
    assert cache.stats()["entries"] == 1


def test_stored_tensors_are_on_cpu_and_own_their_storage() -> None:
    batch = torch.zeros(4, 100)
    if torch.cuda.is_available():
        batch = batch.cuda()
    cache = EmbeddingCache(max_bytes=10_000)
    stored = cache.get_or_compute(
        "a", lambda: ImageEmbedding("m", (1, 1), {"image_embeddings": batch[1], "sizes": [(1, 1)]})
    )
    tensor = stored.tensors["image_embeddings"]
    assert tensor.device.type == "cpu"
    # A view would pin the whole 1600-byte batch while being charged 400.
    assert tensor.untyped_storage().nbytes() == 400
    assert stored.tensors["sizes"] == [(1, 1)]


def test_single_flight_eight_threads_one_compute() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    embedding = make_embedding()
    calls: list[int] = []
    start = threading.Barrier(8)
    results: list[ImageEmbedding] = []
    lock = threading.Lock()

    def compute() -> ImageEmbedding:
        calls.append(1)
        time.sleep(0.3)  # long enough for every thread to arrive while it runs
        return embedding

    def request() -> None:
        start.wait()
        result = cache.get_or_compute("img", compute)
        with lock:
            results.append(result)

    run_threads(request, 8)
    assert len(calls) == 1
    assert cache.computes == 1
    assert len(results) == 8 and all(result is results[0] for result in results)
    assert cache.stats()["hits"] + cache.stats()["misses"] == 8


def test_different_keys_compute_in_parallel() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    # Each compute waits for the other to be running too: under one global lock the
    # second never starts and the barrier breaks.
    both_running = threading.Barrier(2, timeout=5)
    errors: list[BaseException] = []

    def compute() -> ImageEmbedding:
        both_running.wait()
        return make_embedding()

    def request(key: str) -> None:
        try:
            cache.get_or_compute(key, compute)
        except BaseException as exc:  # collected: pytest does not see thread exceptions
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(key,)) for key in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert cache.computes == 2


def test_exception_reaches_every_waiter_and_next_call_retries() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    start = threading.Barrier(8)
    outcomes: list[BaseException | ImageEmbedding] = []
    lock = threading.Lock()

    def failing() -> ImageEmbedding:
        time.sleep(0.3)
        raise RuntimeError("encoder failed")

    def request() -> None:
        start.wait()
        try:
            outcome: BaseException | ImageEmbedding = cache.get_or_compute("img", failing)
        except RuntimeError as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)

    run_threads(request, 8)
    assert len(outcomes) == 8
    assert all(isinstance(o, RuntimeError) and str(o) == "encoder failed" for o in outcomes)
    assert cache.computes == 1
    assert cache.peek("img") is None

    compute, calls = counting(make_embedding())
    assert cache.get_or_compute("img", compute).nbytes == 400
    assert len(calls) == 1


# ---------------------------------------------------------------------- disk tier


def disk_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pt"))


def test_disk_entry_survives_a_new_instance_and_is_promoted(tmp_path: Path) -> None:
    embedding = ImageEmbedding(
        model_id="test/sam",
        image_size=(32, 48),
        tensors={
            "image_embeddings": torch.arange(12, dtype=torch.float16).reshape(3, 4),
            "positional": np.arange(6, dtype=np.float32)[::-1],  # non-contiguous view
            "original_sizes": [(32, 48)],
            "scale": 0.5,
        },
    )
    first = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))
    first.get_or_compute("k", lambda: embedding)
    assert len(disk_files(tmp_path)) == 1
    assert list(tmp_path.glob("*.tmp")) == [], "temp files must be renamed, not left behind"

    restarted = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))
    loaded = restarted.get_or_compute("k", never)
    assert restarted.disk_hits == 1 and restarted.computes == 0
    assert loaded.model_id == "test/sam" and tuple(loaded.image_size) == (32, 48)
    assert torch.equal(loaded.tensors["image_embeddings"], embedding.tensors["image_embeddings"])
    assert isinstance(loaded.tensors["positional"], np.ndarray)
    np.testing.assert_array_equal(loaded.tensors["positional"], embedding.tensors["positional"])
    assert loaded.tensors["original_sizes"] == [(32, 48)]
    assert loaded.tensors["scale"] == 0.5
    # Promoted: the next request is a memory hit, not another disk read.
    assert restarted.peek("k") is loaded
    restarted.get_or_compute("k", never)
    assert restarted.disk_hits == 1 and restarted.hits == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_disk_entry_is_recomputed_counted_and_logged_once(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path)).put("k", make_embedding(400))
    (path,) = disk_files(tmp_path)
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00not a torch file", "empty": b""}[damage]
    )

    cache = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))
    compute, calls = counting(make_embedding(400, fill=2.0))
    with caplog.at_level(logging.WARNING, logger="backend.embedding_cache"):
        result = cache.get_or_compute("k", compute)
    assert len(calls) == 1
    assert cache.disk_errors == 1 and cache.disk_hits == 0
    assert float(result.tensors["image_embeddings"][0]) == 2.0
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1
    # The bad file was replaced by the recomputed entry: a restart reads it fine.
    again = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path)).get_or_compute("k", never)
    assert float(again.tensors["image_embeddings"][0]) == 2.0


def test_corrupted_disk_entry_is_removed_even_when_the_recompute_fails(tmp_path: Path) -> None:
    EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path)).put("k", make_embedding(400))
    (path,) = disk_files(tmp_path)
    path.write_bytes(b"garbage")

    cache = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))

    def failing() -> ImageEmbedding:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("k", failing)
    assert not path.exists(), "a bad file must cost one recompute, not one per request"
    compute, calls = counting(make_embedding(400))
    cache.get_or_compute("k", compute)
    assert len(calls) == 1 and cache.disk_errors == 1


def test_disk_entry_for_another_key_is_not_served(tmp_path: Path) -> None:
    cache = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))
    cache.put("a", make_embedding(400, fill=1.0))
    cache.put("b", make_embedding(400, fill=2.0))
    path_a, path_b = (Path(cache._path(key)) for key in ("a", "b"))
    os.replace(path_b, path_a)  # file of "b" now sits where "a" should be

    fresh = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))
    compute, calls = counting(make_embedding(400, fill=3.0))
    result = fresh.get_or_compute("a", compute)
    assert len(calls) == 1 and fresh.disk_errors == 1
    assert float(result.tensors["image_embeddings"][0]) == 3.0


def test_unwritable_disk_dir_keeps_serving_from_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # works even as root, unlike chmod
    with caplog.at_level(logging.WARNING, logger="backend.embedding_cache"):
        cache = EmbeddingCache(max_bytes=10_000, disk_dir=str(blocker / "cache"))
        for key in ("a", "b", "c"):
            compute, calls = counting(make_embedding())
            assert cache.get_or_compute(key, compute).nbytes == 400
            assert len(calls) == 1
        cache.get_or_compute("a", never)
    assert cache.hits == 1 and cache.disk_errors >= 1
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


def test_disk_full_is_logged_once_and_memory_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    cache = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="backend.embedding_cache"):
        cache.put("a", make_embedding())
        cache.get_or_compute("b", lambda: make_embedding())
    assert cache.disk_errors == 2
    messages = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(messages) == 1 and "disk full" in messages[0]
    assert list(tmp_path.iterdir()) == [], "failed writes must not leave temp files"
    assert cache.get_or_compute("b", never).nbytes == 400


def test_disk_size_bound_evicts_least_recently_used_files(tmp_path: Path) -> None:
    probe = EmbeddingCache(max_bytes=0, disk_dir=str(tmp_path / "probe"))
    probe.put("x", make_embedding(4000))
    file_size = disk_files(tmp_path / "probe")[0].stat().st_size

    directory = tmp_path / "cache"
    cache = EmbeddingCache(max_bytes=0, disk_dir=str(directory), disk_max_bytes=int(file_size * 2.5))
    for key in ("a", "b"):
        cache.put(key, make_embedding(4000))
        time.sleep(0.05)  # file mtimes are only as fine as the kernel's clock tick
    # Reading "a" makes it the most recent, so "b" is the oldest when "c" arrives.
    assert EmbeddingCache(max_bytes=0, disk_dir=str(directory)).get_or_compute("a", never)
    time.sleep(0.05)
    cache.put("c", make_embedding(4000))

    total = sum(path.stat().st_size for path in disk_files(directory))
    assert total <= cache.disk_max_bytes
    assert cache.disk_evictions == 1
    survivors = {key for key in "abc" if Path(cache._path(key)).exists()}
    assert survivors == {"a", "c"}


def test_stale_temp_files_from_crashed_writers_are_swept(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".crashed.tmp", tmp_path / ".writing.tmp"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path)).put("k", make_embedding(400))
    assert not stale.exists()
    assert fresh.exists(), "a recent temp file may belong to a writer in another process"


def test_entry_larger_than_disk_budget_is_not_written(tmp_path: Path) -> None:
    cache = EmbeddingCache(max_bytes=10_000, disk_dir=str(tmp_path), disk_max_bytes=100)
    cache.put("big", make_embedding(400))
    assert disk_files(tmp_path) == []
    assert cache.peek("big") is not None


def test_from_settings_converts_units() -> None:
    settings = Settings(embedding_cache_mb=3, embedding_cache_dir="", embedding_cache_gb=0.5)
    cache = EmbeddingCache.from_settings(settings)
    assert cache.max_bytes == 3 * 1024 * 1024
    assert cache.disk_dir is None
    assert cache.disk_max_bytes == 512 * 1024 * 1024


def test_disk_tier_is_not_shared_across_dtypes(tmp_path: Path) -> None:
    def settings(dtype: str) -> Settings:
        return Settings(embedding_cache_dir=str(tmp_path), device="cpu", dtype=dtype)

    fp32 = EmbeddingCache.from_settings(settings("float32"))
    assert fp32.disk_namespace == "cpu/torch.float32"
    embedding = ImageEmbedding("test/sam", (2, 2), {"image_embeddings": torch.zeros(2)})
    fp32.get_or_compute("k", lambda: embedding)
    bf16 = EmbeddingCache.from_settings(settings("bfloat16"))
    bf16.get_or_compute("k", lambda: embedding)
    assert bf16.disk_hits == 0 and bf16.computes == 1, "a bf16 process must not read fp32 files"
    again = EmbeddingCache.from_settings(settings("float32"))
    again.get_or_compute("k", never)
    assert again.disk_hits == 1
