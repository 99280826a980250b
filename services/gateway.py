"""Entry service: the public HTTP API, composing the model services.

Routes are a FastAPI app mounted on the BentoML service so that every route, native or
OpenAI-compatible, answers errors in one JSON shape (``services.errors``). Each model family's
route logic lives in its own module (``services.clip_api``, ...); this file only wires routes.
The model services are BentoML dependencies: separate processes under ``bentoml serve``
(pickle over a local socket), in-process under ``Gateway.to_asgi()``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import bentoml
from fastapi import FastAPI, File, Form, UploadFile
from starlette.responses import Response

from configuration.settings import get_settings
from services import clip_api, metrics, whisper_api
from services.cache import build_cache
from services.clip import CLIP
from services.clip_api import ClipAPI
from services.embeddings import ClipEmbedder
from services.errors import error_response, install_error_handlers
from services.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware
from services.whisper import Whisper
from services.whisper_api import Granularity, ResponseFormat, WhisperAPI
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
    TranscribeResponse,
)

settings = get_settings()

app = FastAPI(title="Multimodal serving", description="CLIP, LLaVA and Whisper behind one API.")
install_error_handlers(app)
ROUTE_FAMILIES = {route: "clip" for route in clip_api.ROUTES} | {route: "whisper" for route in whisper_api.ROUTES}
app.add_middleware(metrics.RequestMetricsMiddleware, families=ROUTE_FAMILIES)
app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="Gateway", traffic={"timeout": settings.request_timeout_seconds})
class Gateway:
    clip = bentoml.depends(CLIP)
    whisper = bentoml.depends(Whisper)

    def __init__(self) -> None:
        self.embedder = ClipEmbedder(self.clip, build_cache(settings), settings)
        self.clip_api = ClipAPI(self.embedder, settings)
        self.whisper_api = WhisperAPI(self.whisper, settings)

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

    # Whisper (multipart uploads, as OpenAI's audio API takes them)

    @app.post("/v1/audio/transcriptions", response_model=None)
    async def audio_transcriptions(
        self,
        file: Annotated[UploadFile, File(description="The audio: wav, flac, mp3, ogg, m4a/mp4, webm, aac.")],
        model: Annotated[str, Form()],
        language: Annotated[str | None, Form(description="ISO 639-1 code; detected when unset.")] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[ResponseFormat, Form()] = "json",
        temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
        timestamp_granularities: Annotated[list[Granularity] | None, Form(alias="timestamp_granularities[]")] = None,
    ) -> Response:
        """OpenAI-compatible speech to text (Whisper), in the language spoken."""
        return await self.whisper_api.openai(
            "transcribe", file, model, language, prompt, response_format, temperature, timestamp_granularities
        )

    @app.post("/v1/audio/translations", response_model=None)
    async def audio_translations(
        self,
        file: Annotated[UploadFile, File(description="The audio: wav, flac, mp3, ogg, m4a/mp4, webm, aac.")],
        model: Annotated[str, Form()],
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[ResponseFormat, Form()] = "json",
        temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
    ) -> Response:
        """OpenAI-compatible speech to English text (Whisper's translate task)."""
        return await self.whisper_api.openai("translate", file, model, None, prompt, response_format, temperature, None)

    @app.post("/transcribe")
    async def transcribe(
        self,
        file: Annotated[UploadFile, File(description="The audio: wav, flac, mp3, ogg, m4a/mp4, webm, aac.")],
        language: Annotated[str | None, Form(description="ISO 639-1 code; detected when unset.")] = None,
    ) -> TranscribeResponse:
        """Upload audio, get its text and (given or detected) language."""
        return await self.whisper_api.transcribe_upload(file, language)

    # Every family

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        ids = await self.clip_api.model_ids() + await self.whisper_api.model_ids()
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
            await asyncio.wait_for(asyncio.gather(self.embedder.card(), self.whisper_api.ready()), timeout=5)
        except Exception as exc:
            return error_response(503, f"not ready: {exc or type(exc).__name__}", code="not_ready")
        return ReadyResponse()
