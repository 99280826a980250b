"""The library on Milvus, for libraries that outgrow one host: the same interface as the embedded store.

One client for both ways of running Milvus: a local file path (``library.db``) runs milvus-lite, the
real engine in-process from PyPI; ``http://host:19530`` speaks to a Milvus cluster (the Milvus
Operator or Helm chart, deploy/README.md). Each library collection is a Milvus collection named
``library_<name>`` (id VARCHAR primary key, FLOAT_VECTOR, metadata JSON) with strong consistency,
so an add is visible to the next search; the CLIP model it was embedded with is a collection property.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from services.common.errors import APIError
from services.library.store import (
    CollectionModel,
    Filter,
    Metadata,
    StoredHit,
    check_dimensions,
    collection_not_found,
)

log = logging.getLogger(__name__)

PREFIX = "library_"
MODEL_PROPERTY = "library.model"
MAX_ID_LENGTH = 512
BATCH = 1000  # rows per insert, get and delete call: keeps each gRPC message far below Milvus's 64 MB cap


def literal(value: bool | int | float | str) -> str:
    """A value as a Milvus expression literal (milvus-lite has no filter templates to bind it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)  # numbers as they are; strings double-quoted, escaped


def expression(where: Filter | None) -> str:
    # Keys are checked names (protocol.KEY_PATTERN), so they need no escaping.
    return " and ".join(f'metadata["{key}"] == {literal(value)}' for key, value in (where or {}).items())


class MilvusStore:
    def __init__(self, uri: str, token: str | None = None) -> None:
        self.uri, self._token = uri, token
        self._client: MilvusClient | None = None
        self._models: dict[str, CollectionModel] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    if not self.uri.startswith(("http://", "https://", "tcp://", "unix:")):
                        Path(self.uri).parent.mkdir(parents=True, exist_ok=True)  # milvus-lite's file
                    try:
                        self._client = MilvusClient(uri=self.uri, token=self._token or "")
                    except MilvusException as exc:
                        raise APIError(
                            503, f"library store unreachable: {exc.message}", code="store_unavailable"
                        ) from exc
        return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A client call; Milvus's failures in the error shape (503: the store, not the request, failed)."""
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except MilvusException as exc:
            log.warning("milvus %s failed: %s", method, exc)
            raise APIError(503, f"library store: {exc.message}", code="store_unavailable") from exc

    def collections(self) -> list[str]:
        names = [name[len(PREFIX) :] for name in self._call("list_collections") if name.startswith(PREFIX)]
        return sorted(name for name in names if self._read_model(name) is not None)

    def _read_model(self, collection: str) -> CollectionModel | None:
        name = PREFIX + collection
        if not self._call("has_collection", name):
            return None
        properties = self._call("describe_collection", name).get("properties", {})
        if MODEL_PROPERTY not in properties:  # created by a process that died before naming its model
            return None
        return CollectionModel.from_json(properties[MODEL_PROPERTY])

    def describe(self, collection: str) -> CollectionModel:
        model = self._models.get(collection)
        if model is None:
            model = self._read_model(collection)
            if model is None:
                raise collection_not_found(collection)
            self._call("load_collection", PREFIX + collection)  # searchable after a restart
            self._models[collection] = model
        return model

    def ensure(self, collection: str, model: CollectionModel) -> None:
        name = PREFIX + collection
        if collection not in self._models and not self._call("has_collection", name):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=model.dimensions)
            schema.add_field("metadata", DataType.JSON)
            index = self.client.prepare_index_params()
            # AUTOINDEX: Milvus picks the index for its deployment (HNSW-like on a cluster; milvus-lite: FLAT).
            index.add_index("vector", index_type="AUTOINDEX", metric_type="IP")
            try:
                self._call("create_collection", name, schema=schema, index_params=index, consistency_level="Strong")
            except APIError:
                if not self._call("has_collection", name):  # not a lost race with another writer
                    raise
        if self._read_model(collection) is None:
            self._call("alter_collection_properties", name, {MODEL_PROPERTY: model.to_json()})
        self.describe(collection).check_same(collection, model)

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, metadata: list[Metadata]) -> None:
        model = self.describe(collection)
        check_dimensions(vectors, model.dimensions, "vector")
        last = {item_id: i for i, item_id in enumerate(ids)}
        rows = [
            {"id": item_id, "vector": vectors[i].astype(np.float32).tolist(), "metadata": metadata[i]}
            for item_id, i in last.items()
        ]
        # One call per BATCH rows: a batch beyond that is not atomic here (Milvus has no multi-call transaction).
        for start in range(0, len(rows), BATCH):
            self._call("upsert", PREFIX + collection, rows[start : start + BATCH])

    def delete(self, collection: str, ids: list[str]) -> int:
        present = self.lookup(collection, ids)
        for start in range(0, len(present), BATCH):
            self._call("delete", PREFIX + collection, ids=present[start : start + BATCH])
        return len(present)

    def search(self, collection: str, queries: np.ndarray, top_k: int, where: Filter | None) -> list[list[StoredHit]]:
        model = self.describe(collection)
        check_dimensions(queries, model.dimensions, "vector")
        results = self._call(
            "search",
            PREFIX + collection,
            data=queries.astype(np.float32).tolist(),
            limit=top_k,
            filter=expression(where),
            output_fields=["metadata"],
            search_params={"metric_type": "IP"},
        )
        return [
            [StoredHit(str(hit["id"]), float(hit["distance"]), hit["entity"].get("metadata") or {}) for hit in hits]
            for hits in results
        ]

    def lookup(self, collection: str, ids: list[str]) -> list[str]:
        self.describe(collection)
        unique = list(dict.fromkeys(ids))
        found: set[str] = set()
        for start in range(0, len(unique), BATCH):
            rows = self._call("get", PREFIX + collection, ids=unique[start : start + BATCH], output_fields=["id"])
            found.update(str(row["id"]) for row in rows)
        return [item_id for item_id in unique if item_id in found]

    def page(self, collection: str, after: str | None, limit: int) -> list[tuple[str, Metadata]]:
        self.describe(collection)
        # The query iterator walks primary keys in order (a plain query's order is the segments').
        where = f"id > {literal(after)}" if after is not None else ""
        try:
            iterator = self.client.query_iterator(
                PREFIX + collection, batch_size=limit, filter=where, output_fields=["metadata"]
            )
            rows = iterator.next()
            iterator.close()
        except MilvusException as exc:
            raise APIError(503, f"library store: {exc.message}", code="store_unavailable") from exc
        return [(str(row["id"]), row.get("metadata") or {}) for row in rows[:limit]]

    def count(self, collection: str) -> int:
        self.describe(collection)
        rows = self._call("query", PREFIX + collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
