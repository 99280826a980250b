"""Cache-aware embedding on top of the CLIP service, shared by every CLIP route.

Looks every input up in the cache first and sends only the misses to the CLIP service, through
a coalescer that merges concurrent requests' misses into one call (which the CLIP service's
continuous batcher merges with other workers' calls), then stores what came back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from configuration.settings import Settings
from services.clip.cache import EmbeddingCache, Kind, ModelVersion
from services.clip.protocol import ClipModelCard, split_fingerprint, split_text_rows
from services.common import metrics
from services.common.card_cache import LazyCardCache
from services.common.coalescing import Coalescer
from services.common.errors import APIError, retry_once_on_connection_error
from services.common.image_validation import EncodedImage

log = logging.getLogger(__name__)


class ClipEmbedder:
    def __init__(self, clip: Any, cache: EmbeddingCache, settings: Settings) -> None:
        self._clip = clip.to_async  # the dependency proxy; its sync methods would block the event loop
        self._cache = cache
        self._ttl: dict[Kind, int] = {"image": settings.cache_ttl_seconds, "text": settings.query_cache_ttl_seconds}
        self._card: LazyCardCache[ClipModelCard] = LazyCardCache(self._clip)
        # The proxy learns its endpoints from the CLIP service once that answers: look them up per call.
        largest: dict[Kind, int] = {"image": settings.clip_max_batch_size, "text": settings.clip_max_text_batch_size}
        self._encode: dict[Kind, Coalescer] = {
            kind: Coalescer(
                retry_once_on_connection_error(self._caller(f"encode_{kind}s"), "CLIP"),
                max_items=largest[kind],
                max_in_flight=settings.clip_calls_in_flight,
            )
            for kind in ("image", "text")
        }

    def _caller(self, endpoint: str) -> Callable[[list[Any]], Awaitable[Any]]:
        async def call(items: list[Any]) -> Any:  # an array, a row per item
            return await getattr(self._clip, endpoint)(items)

        return call

    @property
    def known_card(self) -> ClipModelCard | None:
        """The model card if the CLIP service has answered before; never waits."""
        return self._card.known

    async def card(self) -> ClipModelCard:
        return await self._card.get()

    async def embed_images(
        self, images: list[EncodedImage], params: list[str], card: ClipModelCard | None = None
    ) -> np.ndarray:
        """L2-normalised embeddings; 400 naming ``params[i]`` for an image that does not decode.

        ``card`` is the model the caller's other vectors come from (one request never mixes two
        models); the current card when not given. 503 ``model_changed`` if another model answers."""
        data, sha256s = [image.data for image in images], [image.sha256 for image in images]
        vectors = await self._embed("image", data, sha256s, card or await self.card())
        for i, vector in enumerate(vectors):
            if np.isnan(vector[0]):
                raise APIError(400, "image could not be decoded", code="invalid_image", param=params[i])
        return vectors

    async def embed_texts(self, texts: list[str], card: ClipModelCard | None = None) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised embeddings and each text's token count (``card`` as in ``embed_images``)."""
        sha256s = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
        return split_text_rows(await self._embed("text", texts, sha256s, card or await self.card()))

    async def _embed(self, kind: Kind, items: list[Any], sha256s: list[str], card: ClipModelCard) -> np.ndarray:
        version = ModelVersion(card.model, card.revision, card.preprocessing)
        keys = [version.key(kind, sha) for sha in sha256s]
        found = await self._cache.get_many(keys)
        missing = [i for i, row in enumerate(found) if row is None]
        metrics.record_cache(kind, hits=len(keys) - len(missing), misses=len(missing))
        fresh: dict[str, np.ndarray] = {}
        if missing:
            # The same content twice in one request is encoded once.
            unique = {keys[i]: i for i in missing}
            with metrics.queued("clip"):
                encoded, fingerprints = split_fingerprint(await self._encode[kind]([items[i] for i in unique.values()]))
            if fingerprints != {card.fingerprint}:
                # Another model answered than the card says (a rolling update of the CLIP service):
                # its vectors must neither be stored under this card's keys nor meet this card's
                # vectors in one answer. The client retries; by then the card is asked for again.
                log.warning("CLIP answered with model %s, not %s: forgetting its card", fingerprints, card.fingerprint)
                self._card.forget(card)
                raise APIError(503, "the CLIP model changed during this request; retry it", code="model_changed")
            fresh = dict(zip(unique, encoded, strict=True))
            # An image that did not decode (a row of NaN) is not worth remembering.
            await self._cache.set_many(
                {key: row for key, row in fresh.items() if not np.isnan(row[0])}, self._ttl[kind]
            )
        rows = [row if row is not None else fresh[key] for row, key in zip(found, keys, strict=True)]
        return np.stack(rows).astype(np.float32, copy=False)
