"""Embedding cache: in-process LRU by default, Redis when a URL is configured.

A key names everything that determines an embedding: model, revision, preprocessing version
and the sha256 of the content. The cache is only ever an optimisation: any Redis failure is a
miss (and Redis is skipped for a while after one), never a failed request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import numpy as np
from cachetools import TLRUCache

from configuration.settings import Settings
from services.common.metrics import CACHE_ERRORS

log = logging.getLogger(__name__)

Kind = Literal["image", "text"]


@dataclass(frozen=True)
class ModelVersion:
    """What besides the content determines an embedding."""

    model: str
    revision: str
    preprocessing: str

    def key(self, kind: Kind, content_sha256: str) -> str:
        return f"emb:{self.model}:{self.revision}:{self.preprocessing}:{kind}:{content_sha256}"


class EmbeddingCache(Protocol):
    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]: ...

    async def set_many(self, items: dict[str, np.ndarray], ttl_seconds: int) -> None: ...


class NoCache:
    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        return [None] * len(keys)

    async def set_many(self, items: dict[str, np.ndarray], ttl_seconds: int) -> None:
        return None


class InProcessCache:
    """LRU bounded by entry count, each entry expiring after its own TTL."""

    def __init__(self, max_entries: int) -> None:
        self._entries: TLRUCache[str, tuple[np.ndarray, float]] = TLRUCache(
            maxsize=max_entries, ttu=lambda _key, value, now: now + value[1], timer=time.monotonic
        )

    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        return [entry[0] if (entry := self._entries.get(key)) is not None else None for key in keys]

    async def set_many(self, items: dict[str, np.ndarray], ttl_seconds: int) -> None:
        for key, vector in items.items():
            self._entries[key] = (vector, float(ttl_seconds))


class RedisCache:
    """Vectors stored as little-endian float32 bytes with a TTL."""

    def __init__(self, url: str, timeout_seconds: float, retry_after_seconds: float) -> None:
        import redis.asyncio as redis

        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds, retry_on_timeout=False
        )
        self._retry_after = retry_after_seconds
        self._skip_until = 0.0

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, operation: str, exc: Exception) -> None:
        CACHE_ERRORS.labels("redis").inc()
        self._skip_until = time.monotonic() + self._retry_after
        log.warning("redis %s failed (%s); serving without the cache for %.0f s", operation, exc, self._retry_after)

    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = await self._client.mget(keys)
        except Exception as exc:
            self._failed("get", exc)
            return [None] * len(keys)
        # The client does not decode responses: each value is the stored bytes, or None.
        return [np.frombuffer(v, dtype="<f4") if v else None for v in cast("list[bytes | None]", values)]

    async def set_many(self, items: dict[str, np.ndarray], ttl_seconds: int) -> None:
        if not items or not self._available():
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, vector in items.items():
                    pipe.set(key, np.asarray(vector, dtype="<f4").tobytes(), ex=ttl_seconds)
                await pipe.execute()
        except Exception as exc:
            self._failed("set", exc)


def build_cache(settings: Settings) -> EmbeddingCache:
    backend = settings.effective_cache_backend
    if backend == "redis":
        if not settings.redis_url:
            raise ValueError("MULTIMODAL_CACHE_BACKEND=redis needs MULTIMODAL_REDIS_URL")
        return RedisCache(settings.redis_url, settings.redis_timeout_seconds, settings.redis_retry_after_seconds)
    if backend == "none":
        return NoCache()
    return InProcessCache(settings.cache_max_entries)
