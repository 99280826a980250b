"""The image library's requests and responses. Pydantic only: importing this never imports torch.

Names follow the stores' common ground: a collection name is what Milvus accepts as a collection
name (letters, digits, underscores), a metadata key what both stores can filter on without quoting.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from services.common.schemas import StrictRequest

COLLECTION_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,62}$"
KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_ID_CHARS = 256
MAX_METADATA_BYTES = 4096
MAX_FILTER_KEYS = 16

ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
# Strict: JSON true stays a boolean and 1 an integer, so that a filter means the same in both stores.
Scalar = StrictBool | StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)] | StrictStr
Metadata = dict[str, Scalar | None]


def check_keys(value: dict[str, Any], what: str) -> dict[str, Any]:
    for key in value:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"{what} key {key!r} must be letters, digits and underscores (at most 64)")
    return value


class LibraryImage(StrictRequest):
    id: ItemId | None = Field(
        None, description="Your id for the image; the SHA-256 of its bytes when unset. Adding an id again replaces it."
    )
    image: str = Field(min_length=1, description="The image, base64 (raw or a `data:image/...;base64,` URL).")
    metadata: Metadata = Field(default_factory=dict, description="Flat JSON object of scalars, for filters.")

    @field_validator("metadata")
    @classmethod
    def _small_flat_metadata(cls, value: Metadata) -> Metadata:
        check_keys(value, "metadata")
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is limited to {MAX_METADATA_BYTES} bytes of JSON")
        return value


class AddRequest(StrictRequest):
    images: list[LibraryImage] = Field(min_length=1, description="Images to add (or replace, by id).")


class AddResponse(BaseModel):
    collection: str
    ids: list[str] = Field(description="Each image's id, in request order.")
    count: int = Field(description="Images in the collection after this add.")


class LibrarySearchRequest(StrictRequest):
    text: str | None = Field(None, description="Find images that match this text.")
    image: str | None = Field(None, description="Find images like this one (base64 or a data: URL).")
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="Find images near this embedding (normalised here)."
    )
    top_k: int = Field(10, ge=1, description="How many results (at most MULTIMODAL_LIBRARY_MAX_TOP_K).")
    filter: dict[str, Scalar] | None = Field(
        None, description='Metadata equality: every key must equal its value (`{"album": "2024"}`).'
    )

    @field_validator("filter")
    @classmethod
    def _filter_keys(cls, value: dict[str, Scalar] | None) -> dict[str, Scalar] | None:
        if value is not None:
            check_keys(value, "filter")
            if len(value) > MAX_FILTER_KEYS:
                raise ValueError(f"at most {MAX_FILTER_KEYS} filter keys")
        return value

    @model_validator(mode="after")
    def _one_query(self) -> LibrarySearchRequest:
        given = [name for name in ("text", "image", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, image or vector")
        return self


class Hit(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity to the query.")
    metadata: Metadata


class LibrarySearchResponse(BaseModel):
    collection: str
    data: list[Hit] = Field(description="Best first.")


class IdsRequest(StrictRequest):
    ids: list[ItemId] = Field(min_length=1)


class DeleteResponse(BaseModel):
    collection: str
    deleted: int = Field(description="How many of the ids were in the collection.")
    count: int = Field(description="Images in the collection after this delete.")


class LookupResponse(BaseModel):
    collection: str
    found: list[str] = Field(description="The ids asked about that the collection holds.")


class Item(BaseModel):
    id: str
    metadata: Metadata


class ItemPage(BaseModel):
    collection: str
    data: list[Item] = Field(description="In id order.")
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last.")


class CollectionInfo(BaseModel):
    name: str
    count: int
    dimensions: int
    model: str = Field(description="The CLIP model whose embeddings the collection holds.")


class CollectionList(BaseModel):
    data: list[CollectionInfo]
