"""The image library routes' logic: embed through CLIP (``ClipEmbedder``), then ask the store.

``services.library.routes`` declares the URLs; the entry service builds this when it serves CLIP.
Store calls block (files, SQLite, gRPC to Milvus), so they run in threads; searches of one
collection with the same ``top_k`` and filter are merged into one store call (``batching``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from configuration.settings import Settings
from services.clip.api import check_text
from services.clip.embedder import ClipEmbedder
from services.common import metrics
from services.common.coalescing import Coalescer
from services.common.errors import APIError
from services.common.image_validation import ImageReader
from services.common.pixel_budget import PixelBudget
from services.library.protocol import (
    AddRequest,
    AddResponse,
    CollectionInfo,
    CollectionList,
    DeleteResponse,
    Hit,
    IdsRequest,
    Item,
    ItemPage,
    LibrarySearchRequest,
    LibrarySearchResponse,
    LookupResponse,
)
from services.library.store import CollectionModel, Filter, LibraryStore, StoredHit

T = TypeVar("T")
QUERIES_PER_SEARCH = 64  # queries merged into one store search at most
log = logging.getLogger(__name__)


class LibraryAPI:
    def __init__(self, embedder: ClipEmbedder, store: LibraryStore, settings: Settings, pixels: PixelBudget) -> None:
        self.embedder, self.store, self.settings, self.pixels = embedder, store, settings, pixels
        self.images = ImageReader(settings)
        self._batchers: dict[tuple[str, int, str], Coalescer[np.ndarray, list[StoredHit]]] = {}
        self._models: dict[str, CollectionModel] = {}  # a collection's model never changes
        self._report_sizes()

    def _report_sizes(self) -> None:
        """Each collection's size on /metrics from the start, not only once a request touches it."""
        try:
            for name in self.store.collections():
                metrics.LIBRARY_INDEX_SIZE.labels(name).set(self.store.count(name))
        except Exception as exc:  # an unreachable Milvus must not stop the entry service from starting
            log.warning("library sizes not reported at start: %r", exc)

    async def _describe(self, collection: str) -> CollectionModel:
        """The collection's model (404 if there is none); asked of the store once, not per search."""
        model = self._models.get(collection)
        if model is None:
            model = self._models[collection] = await self._store(self.store.describe, collection)
        return model

    async def _store(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    def _check_count(self, count: int, param: str) -> None:
        if count > self.settings.max_inputs_per_request:
            limit = self.settings.max_inputs_per_request
            raise APIError(400, f"at most {limit} items per request", code="too_many_inputs", param=param)

    async def _count(self, collection: str) -> int:
        count = await self._store(self.store.count, collection)
        metrics.LIBRARY_INDEX_SIZE.labels(collection).set(count)
        return count

    async def add(self, collection: str, request: AddRequest) -> AddResponse:
        start = time.perf_counter()
        self._check_count(len(request.images), "images")
        images = [self.images.read(item.image, f"images[{i}].image") for i, item in enumerate(request.images)]
        # Without an id, the image's content is its id: adding the same bytes twice keeps one copy.
        ids = [item.id or image.sha256 for item, image in zip(request.images, images, strict=True)]
        card = await self.embedder.card()
        model = CollectionModel.of(card)
        try:
            (await self._describe(collection)).check_same(collection, model)  # 409 before any embedding
        except APIError as error:
            if error.code != "collection_not_found":
                raise
        with self.pixels.admit(sum(image.pixels for image in images), param="images"):
            params = [f"images[{i}].image" for i in range(len(images))]
            vectors = await self.embedder.embed_images(images, params, card)
        # Created only now: an add refused for an image that does not decode leaves no empty collection.
        await self._store(self.store.ensure, collection, model)
        await self._store(self.store.upsert, collection, ids, vectors, [item.metadata for item in request.images])
        metrics.LIBRARY_ITEMS_ADDED.labels(collection).inc(len(ids))
        metrics.LIBRARY_ADD_DURATION.observe(time.perf_counter() - start)
        return AddResponse(collection=collection, ids=ids, count=await self._count(collection))

    async def search(self, collection: str, request: LibrarySearchRequest) -> LibrarySearchResponse:
        start = time.perf_counter()
        if request.top_k > self.settings.library_max_top_k:
            limit = self.settings.library_max_top_k
            raise APIError(400, f"top_k must be at most {limit}", code="invalid_value", param="top_k")
        model = await self._describe(collection)  # 404 for an unknown collection
        by, query = await self._query(collection, model, request)
        where = request.filter or None
        (hits,) = await self._batcher(collection, request.top_k, where).each([query])
        metrics.LIBRARY_SEARCH_DURATION.labels(by).observe(time.perf_counter() - start)
        data = [Hit(id=hit.id, score=hit.score, metadata=hit.metadata) for hit in hits]
        return LibrarySearchResponse(collection=collection, data=data)

    async def _query(
        self, collection: str, model: CollectionModel, request: LibrarySearchRequest
    ) -> tuple[str, np.ndarray]:
        if request.vector is not None:
            vector = np.asarray(request.vector, dtype=np.float32)
            if len(vector) != model.dimensions:
                message = f"collection {collection!r} holds {model.dimensions}-dimension vectors, not {len(vector)}"
                raise APIError(400, message, code="dimension_mismatch", param="vector")
            norm = float(np.linalg.norm(vector))
            if not np.isfinite(norm) or norm == 0:
                raise APIError(400, "vector must be finite and not zero", code="invalid_value", param="vector")
            return "vector", vector / norm
        card = await self.embedder.card()
        model.check_same(collection, CollectionModel.of(card))  # a text of another model would match noise
        if request.text is not None:
            check_text(request.text, "text", self.settings.max_text_chars)
            vectors, _ = await self.embedder.embed_texts([request.text], card)
            return "text", vectors[0]
        assert request.image is not None  # LibrarySearchRequest allows exactly one of the three
        image = self.images.read(request.image, "image")
        with self.pixels.admit(image.pixels, param="image"):
            vectors = await self.embedder.embed_images([image], ["image"], card)
        return "image", vectors[0]

    def _batcher(self, collection: str, top_k: int, where: Filter | None) -> Coalescer[np.ndarray, list[StoredHit]]:
        """Searches of one collection (top k, filter) waiting while one runs go together in the next:
        exact search reads every vector once per product, and on a GPU a million float16 rows take
        about as long to multiply by 64 queries as by one (the read, not the arithmetic, is the cost)."""
        key = (collection, top_k, json.dumps(where, sort_keys=True))
        batcher = self._batchers.get(key)
        if batcher is None:

            async def send(queries: list[np.ndarray]) -> list[list[StoredHit]]:
                return await self._store(self.store.search, collection, np.stack(queries), top_k, where)

            # Keys come from requests: keep the table bounded (a dropped batcher only loses its merging).
            if len(self._batchers) >= 1024:
                self._batchers.clear()
            batcher = self._batchers[key] = Coalescer(send, max_items=QUERIES_PER_SEARCH, max_in_flight=1)
        return batcher

    async def delete(self, collection: str, request: IdsRequest) -> DeleteResponse:
        self._check_count(len(request.ids), "ids")
        await self._store(self.store.describe, collection)
        deleted = await self._store(self.store.delete, collection, list(request.ids))
        return DeleteResponse(collection=collection, deleted=deleted, count=await self._count(collection))

    async def lookup(self, collection: str, request: IdsRequest) -> LookupResponse:
        if len(request.ids) > self.settings.library_max_page:
            limit = self.settings.library_max_page
            raise APIError(400, f"at most {limit} ids per lookup", code="too_many_inputs", param="ids")
        await self._store(self.store.describe, collection)
        return LookupResponse(
            collection=collection, found=await self._store(self.store.lookup, collection, request.ids)
        )

    async def page(self, collection: str, after: str | None, limit: int) -> ItemPage:
        if limit > self.settings.library_max_page:
            raise APIError(
                400, f"limit must be at most {self.settings.library_max_page}", code="invalid_value", param="limit"
            )
        await self._store(self.store.describe, collection)
        rows = await self._store(self.store.page, collection, after, limit)
        data = [Item(id=item_id, metadata=metadata) for item_id, metadata in rows]
        return ItemPage(collection=collection, data=data, next_after=data[-1].id if len(data) == limit else None)

    async def info(self, collection: str) -> CollectionInfo:
        model = await self._store(self.store.describe, collection)
        count = await self._count(collection)
        return CollectionInfo(name=collection, count=count, dimensions=model.dimensions, model=model.model)

    async def collections(self) -> CollectionList:
        names = await self._store(self.store.collections)
        return CollectionList(data=[await self.info(name) for name in names])
