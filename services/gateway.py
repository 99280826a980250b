"""Entry service: the public HTTP API, composing the model services.

Routes are a FastAPI app mounted on the BentoML service so that every route, native or
OpenAI-compatible, answers errors in one JSON shape (``services.errors``). Each model family's
route logic lives in its own module (``services.clip_api``, ...); this file only wires routes.
The model services are BentoML dependencies: separate processes under ``bentoml serve``
(pickle over a local socket), in-process under ``Gateway.to_asgi()``.
"""

from __future__ import annotations

import asyncio

import bentoml
from fastapi import FastAPI

from configuration.settings import get_settings
from services import clip_api, metrics
from services.cache import build_cache
from services.clip import CLIP
from services.clip_api import ClipAPI
from services.embeddings import ClipEmbedder
from services.errors import error_response, install_error_handlers
from services.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware
from services.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    HealthResponse,
    ModelList,
    ModelObject,
    ReadyResponse,
    SearchRequest,
    SearchResponse,
)

settings = get_settings()

app = FastAPI(title="Multimodal serving", description="CLIP, LLaVA and Whisper behind one API.")
install_error_handlers(app)
app.add_middleware(metrics.RequestMetricsMiddleware, families={route: "clip" for route in clip_api.ROUTES})
app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="Gateway", traffic={"timeout": settings.request_timeout_seconds})
class Gateway:
    clip = bentoml.depends(CLIP)

    def __init__(self) -> None:
        self.embedder = ClipEmbedder(self.clip, build_cache(settings), settings)
        self.clip_api = ClipAPI(self.embedder, settings)

    # CLIP

    @app.post("/search", response_model_exclude_none=True)
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Rank texts by cosine similarity to an image."""
        return await self.clip_api.search(request)

    @app.post("/classify")
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """Zero-shot classification: softmax over CLIP's scaled image-text logits."""
        return await self.clip_api.classify(request)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI-compatible embeddings of texts, and of images given as base64 ``data:`` URLs."""
        return await self.clip_api.embeddings(request)

    # Every family

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        ids = await self.clip_api.model_ids()
        return ModelList(data=[ModelObject(id=model_id) for model_id in ids])

    @app.get("/health")
    async def health(self) -> HealthResponse:
        """Liveness: answers without calling any model service."""
        known = self.embedder.known_card
        return HealthResponse(device=known.device if known else settings.device)

    @app.get("/ready", response_model=ReadyResponse)
    async def ready(self):
        """Readiness: every model service answers."""
        try:
            await asyncio.wait_for(self.embedder.card(), timeout=5)
        except Exception as exc:
            return error_response(503, f"not ready: {exc or type(exc).__name__}", code="not_ready")
        return ReadyResponse()
