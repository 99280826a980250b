"""The CLIP family's URLs: ``/search``, ``/classify`` and OpenAI's ``/v1/embeddings``.

Declared once, on this router, which the entry service mounts; what each route does is
``services.clip.api.ClipAPI``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from services.clip.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    SearchRequest,
    SearchResponse,
)
from services.common.errors import MODEL_ROUTE_ERRORS
from services.common.routing import served_family

if TYPE_CHECKING:
    from services.clip.api import ClipAPI

router = APIRouter(tags=["clip"])


def _clip() -> ClipAPI:
    return served_family("clip")


@router.post("/search", response_model_exclude_none=True, responses=MODEL_ROUTE_ERRORS)
async def search(request: SearchRequest) -> SearchResponse:
    """Rank texts by cosine similarity to an image."""
    return await _clip().search(request)


@router.post("/classify", responses=MODEL_ROUTE_ERRORS)
async def classify(request: ClassifyRequest) -> ClassifyResponse:
    """Zero-shot classification: softmax over CLIP's scaled image-text logits."""
    return await _clip().classify(request)


@router.post("/v1/embeddings", responses=MODEL_ROUTE_ERRORS)
async def embeddings(request: EmbeddingsRequest) -> EmbeddingsResponse:
    """OpenAI-compatible embeddings of texts, and of images given as base64 ``data:`` URLs."""
    return await _clip().embeddings(request)
