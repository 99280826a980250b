"""Cache-aware embedding on top of the CLIP service, shared by every CLIP route.

Looks every input up in the cache first and sends only the misses to the CLIP service in one
call (whose adaptive batcher merges it with other requests' calls), then stores what came back.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from configuration.settings import Settings
from services import metrics
from services.cache import EmbeddingCache, Kind, ModelVersion
from services.clip import ClipModelCard
from services.model_card import ModelCard


class ClipEmbedder:
    def __init__(self, clip: Any, cache: EmbeddingCache, settings: Settings) -> None:
        self._clip = clip.to_async  # the dependency proxy; its sync methods would block the event loop
        self._cache = cache
        self._ttl: dict[Kind, int] = {"image": settings.cache_ttl_seconds, "text": settings.query_cache_ttl_seconds}
        self._card: ModelCard[ClipModelCard] = ModelCard(self._clip)

    @property
    def known_card(self) -> ClipModelCard | None:
        """The model card if the CLIP service has answered before; never waits."""
        return self._card.known

    async def card(self) -> ClipModelCard:
        return await self._card.get()

    async def embed_images(self, images: list[Any], sha256s: list[str]) -> np.ndarray:
        return await self._embed("image", images, sha256s, self._clip.encode_images)

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        sha256s = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
        return await self._embed("text", texts, sha256s, self._clip.encode_texts)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return await self._clip.count_tokens(texts)

    async def _embed(self, kind: Kind, items: list[Any], sha256s: list[str], encode: Any) -> np.ndarray:
        card = await self.card()
        version = ModelVersion(card.model, card.revision, card.preprocessing)
        keys = [version.key(kind, sha) for sha in sha256s]
        found = await self._cache.get_many(keys)
        missing = [i for i, vector in enumerate(found) if vector is None]
        metrics.record_cache(kind, hits=len(keys) - len(missing), misses=len(missing))
        if missing:
            # The same content twice in one request is encoded once.
            unique = {keys[i]: i for i in missing}
            with metrics.queued("clip"):
                encoded = await encode([items[i] for i in unique.values()])
            fresh = {key: np.asarray(vector, dtype=np.float32) for key, vector in zip(unique, encoded)}
            await self._cache.set_many(fresh, self._ttl[kind])
            for i in missing:
                found[i] = fresh[keys[i]]
        return np.stack(found).astype(np.float32, copy=False)
