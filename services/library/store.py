"""What a library store does, whichever engine keeps the vectors: ``embedded`` (the default, files
on this host) or ``milvus`` (milvus-lite in-process, or a Milvus cluster by URI).

Stores are synchronous (the entry service calls them in a thread) and take L2-normalised float32
vectors; a score is the inner product, so the cosine similarity. Errors meant for the client are
raised as ``APIError`` in the one error shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from services.common.errors import APIError

if TYPE_CHECKING:
    from configuration.settings import Settings
    from services.clip.protocol import ClipModelCard

Scalar = bool | int | float | str
Metadata = dict[str, Scalar | None]
Filter = dict[str, Scalar]


@dataclass(frozen=True)
class CollectionModel:
    """The model a collection's vectors were embedded with: vectors of two models never meet in one
    collection, since their similarities would mean nothing (and the store could not tell)."""

    model: str
    fingerprint: int  # ClipModelCard.fingerprint: model, revision, preprocessing and dimensions
    dimensions: int

    @classmethod
    def of(cls, card: ClipModelCard) -> CollectionModel:
        return cls(card.model, card.fingerprint, card.embedding_dim)

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "fingerprint": self.fingerprint, "dimensions": self.dimensions})

    @classmethod
    def from_json(cls, text: str) -> CollectionModel:
        value = json.loads(text)
        return cls(str(value["model"]), int(value["fingerprint"]), int(value["dimensions"]))

    def check_same(self, collection: str, other: CollectionModel) -> None:
        """409 unless ``other`` (this deployment's model) made this collection's vectors."""
        if other != self:
            message = (
                f"collection {collection!r} holds embeddings of {self.model} ({self.dimensions} dimensions, "
                f"fingerprint {self.fingerprint}); this deployment serves {other.model} ({other.dimensions} "
                f"dimensions, fingerprint {other.fingerprint}): re-index it into a new collection"
            )
            raise APIError(409, message, code="model_mismatch", param="collection")


@dataclass(frozen=True)
class StoredHit:
    id: str
    score: float
    metadata: Metadata


def collection_not_found(name: str) -> APIError:
    return APIError(404, f"collection {name!r} does not exist; add images to create it", code="collection_not_found")


def check_dimensions(vectors: np.ndarray, expected: int, param: str) -> None:
    if vectors.ndim != 2 or vectors.shape[1] != expected:
        got = vectors.shape[-1] if vectors.ndim else 0
        raise APIError(
            400,
            f"vectors of this collection have {expected} dimensions, not {got}",
            code="dimension_mismatch",
            param=param,
        )


def matches(metadata: Metadata, where: Filter) -> bool:
    """The filter's meaning in Python (the stores compute it in SQL or in Milvus's expressions): every key
    present with an equal value. Numbers compare as numbers (1 == 1.0, and true == 1 as in both
    engines); a string never equals a number."""
    return all(metadata.get(key) is not None and metadata.get(key) == wanted for key, wanted in where.items())


class LibraryStore(Protocol):
    """Named collections of (id, vector, metadata); ids are unique within a collection."""

    def collections(self) -> list[str]: ...

    def describe(self, collection: str) -> CollectionModel:
        """The collection's model; 404 ``collection_not_found`` when there is no such collection."""
        ...

    def ensure(self, collection: str, model: CollectionModel) -> None:
        """Create the collection for ``model``'s vectors, or check that it holds them (409)."""
        ...

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, metadata: list[Metadata]) -> None:
        """Add the items, replacing any with the same id; all or nothing. Ids repeated in one call: the last wins."""
        ...

    def delete(self, collection: str, ids: list[str]) -> int:
        """Remove these ids; how many were there."""
        ...

    def search(self, collection: str, queries: np.ndarray, top_k: int, where: Filter | None) -> list[list[StoredHit]]:
        """Each query's ``top_k`` nearest items (best first) among those matching ``where``."""
        ...

    def lookup(self, collection: str, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that the collection holds."""
        ...

    def page(self, collection: str, after: str | None, limit: int) -> list[tuple[str, Metadata]]:
        """Up to ``limit`` items with ids after ``after``, in id order."""
        ...

    def count(self, collection: str) -> int: ...

    def close(self) -> None: ...


def library_path(settings: Settings) -> Path:
    """``MULTIMODAL_LIBRARY_PATH``, else ``library/`` in the BentoML home (each test server has its own)."""
    if settings.library_path is not None:
        return settings.library_path
    return Path(os.environ.get("BENTOML_HOME", "~/bentoml")).expanduser() / "library"


def open_store(settings: Settings) -> LibraryStore:
    """The store the settings select; each engine's code is imported only when chosen."""
    if settings.library_store == "milvus":
        from services.library.milvus import MilvusStore

        uri = settings.library_milvus_uri or str(library_path(settings) / "milvus.db")
        return MilvusStore(uri, token=settings.library_milvus_token)
    from services.library.embedded import EmbeddedStore

    return EmbeddedStore(library_path(settings), device=settings.library_search_device)
