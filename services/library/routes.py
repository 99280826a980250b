"""The image library's URLs, under ``/v1/library``; what each does is ``services.library.api.LibraryAPI``.

The library belongs to the CLIP family: its vectors are CLIP embeddings, made by the CLIP service,
so it is served exactly when CLIP is (a deployment without CLIP answers 404 ``not_served``). It is
not a family of its own: a family is a model service to import, deploy and scale, and the library
has no model. Its requests are not counted in ``clip_requests_total``: a bulk add is slow by
nature and would trip CLIP's latency alerts; the library has its own metrics (``library_*``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import bentoml
from fastapi import APIRouter, Path, Query

from services.common.errors import MODEL_ROUTE_ERRORS, error_responses
from services.common.routing import served_family
from services.library.protocol import (
    COLLECTION_PATTERN,
    MAX_ID_CHARS,
    AddRequest,
    AddResponse,
    CollectionInfo,
    CollectionList,
    DeleteResponse,
    IdsRequest,
    ItemPage,
    LibrarySearchRequest,
    LibrarySearchResponse,
    LookupResponse,
)

if TYPE_CHECKING:
    from services.library.api import LibraryAPI

router = APIRouter(prefix="/v1/library", tags=["library"])

CollectionName = Annotated[
    str, Path(pattern=COLLECTION_PATTERN, description="Letters, digits and underscores, starting with a letter.")
]
# `path`: ids made from file paths (the indexing CLI's) hold slashes.
ItemIdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]
WITH_MODEL = {**MODEL_ROUTE_ERRORS, **error_responses(409)}
READ_ERRORS = error_responses(400, 404, 429, 503)
WRITE_ERRORS = error_responses(400, 404, 413, 429, 503)


def _library() -> LibraryAPI:
    served_family("clip")  # 404 not_served where CLIP is not served
    return bentoml.get_current_service().library


@router.get("", responses=READ_ERRORS)
async def collections() -> CollectionList:
    """Every collection, with its size and model."""
    return await _library().collections()


@router.get("/{collection}", responses=READ_ERRORS)
async def collection_info(collection: CollectionName) -> CollectionInfo:
    """One collection's size, dimensions and model."""
    return await _library().info(collection)


@router.post("/{collection}/images", responses=WITH_MODEL)
async def add_images(collection: CollectionName, request: AddRequest) -> AddResponse:
    """Add images (the collection is created by its first add); an id added again is replaced."""
    return await _library().add(collection, request)


@router.get("/{collection}/images", responses=READ_ERRORS)
async def list_images(
    collection: CollectionName,
    after: Annotated[
        str | None, Query(max_length=MAX_ID_CHARS, description="The last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, description="Items per page (at most MULTIMODAL_LIBRARY_MAX_PAGE).")] = 100,
) -> ItemPage:
    """Ids and metadata, in id order, a page at a time."""
    return await _library().page(collection, after, limit)


@router.delete("/{collection}/images/{item_id:path}", responses=READ_ERRORS)
async def delete_image(collection: CollectionName, item_id: ItemIdPath) -> DeleteResponse:
    """Remove one image (``deleted`` is 0 if it was not there)."""
    return await _library().delete(collection, IdsRequest(ids=[item_id]))


@router.post("/{collection}/delete", responses=WRITE_ERRORS)
async def delete_images(collection: CollectionName, request: IdsRequest) -> DeleteResponse:
    """Remove several images by id."""
    return await _library().delete(collection, request)


@router.post("/{collection}/lookup", responses=WRITE_ERRORS)
async def lookup(collection: CollectionName, request: IdsRequest) -> LookupResponse:
    """Which of these ids the collection holds (the indexing CLI asks before embedding)."""
    return await _library().lookup(collection, request)


@router.post("/{collection}/search", responses=WITH_MODEL)
async def search(collection: CollectionName, request: LibrarySearchRequest) -> LibrarySearchResponse:
    """The ``top_k`` images nearest a text, an image or a vector, optionally among those whose metadata match."""
    return await _library().search(collection, request)
