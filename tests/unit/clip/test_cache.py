"""The embedding cache: in-process LRU with TTLs, Redis, and Redis failures as misses."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from configuration.settings import Settings
from services.clip.cache import InProcessCache, ModelVersion, NoCache, RedisCache, build_cache


def run(coro):
    return asyncio.run(coro)


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


def test_key_names_model_revision_preprocessing_kind_and_content():
    version = ModelVersion("tiny-clip", "abc123", "pre1-float32")
    assert version.key("image", "f" * 64) == f"emb:tiny-clip:abc123:pre1-float32:image:{'f' * 64}"
    assert version.key("image", "0" * 64) != ModelVersion("tiny-clip", "def456", "pre1-float32").key("image", "0" * 64)


def test_in_process_cache_returns_what_was_stored_until_its_ttl(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache = InProcessCache(max_entries=10)
    run(cache.set_many({"a": vector(0)}, ttl_seconds=10))
    run(cache.set_many({"b": vector(1)}, ttl_seconds=100))
    a, b, c = run(cache.get_many(["a", "b", "c"]))
    np.testing.assert_array_equal(a, vector(0))
    np.testing.assert_array_equal(b, vector(1))
    assert c is None
    now[0] += 50
    assert run(cache.get_many(["a", "b"]))[0] is None  # a expired, b not
    assert run(cache.get_many(["b"]))[0] is not None


def test_in_process_cache_evicts_least_recently_used():
    cache = InProcessCache(max_entries=2)
    run(cache.set_many({"a": vector(0), "b": vector(1)}, ttl_seconds=60))
    run(cache.get_many(["a"]))  # a is now more recent than b
    run(cache.set_many({"c": vector(2)}, ttl_seconds=60))
    assert [v is not None for v in run(cache.get_many(["a", "b", "c"]))] == [True, False, True]


def test_backend_selection():
    assert isinstance(build_cache(Settings()), InProcessCache)
    assert isinstance(build_cache(Settings(cache_backend="none")), NoCache)
    assert isinstance(build_cache(Settings(redis_url="redis://127.0.0.1:1/0")), RedisCache)
    with pytest.raises(ValueError):
        build_cache(Settings(cache_backend="redis"))


def test_redis_cache_round_trip_with_ttl(redis_server):
    cache = RedisCache(redis_server.url, timeout_seconds=1, retry_after_seconds=5)

    async def scenario():
        await cache.set_many({"emb:x": vector(0), "emb:y": vector(1)}, ttl_seconds=30)
        return await cache.get_many(["emb:x", "emb:y", "emb:z"])

    x, y, z = run(scenario())
    np.testing.assert_array_equal(x, vector(0))
    np.testing.assert_array_equal(y, vector(1))
    assert z is None
    assert 0 < redis_server.client().ttl("emb:x") <= 30


def test_unreachable_redis_is_a_miss_and_is_skipped_for_a_while(redis_server):
    redis_server.process.kill()
    cache = RedisCache(redis_server.url, timeout_seconds=0.5, retry_after_seconds=60)

    async def scenario():
        await cache.set_many({"emb:x": vector(0)}, ttl_seconds=30)  # swallowed
        first = await cache.get_many(["emb:x"])
        skipped = not cache._available()
        return first, skipped

    first, skipped = run(scenario())
    assert first == [None]
    assert skipped
