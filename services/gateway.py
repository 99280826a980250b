"""Entry service: the public HTTP API, composing the model services.

Routes are a FastAPI app mounted on the BentoML service so that every route, native or
OpenAI-compatible, answers errors in one JSON shape (``services.common.errors``). Each model family's
route logic lives in its own module (``services.clip.api``, ...); this file only wires routes.
The model services are BentoML dependencies: separate processes under ``bentoml serve``
(pickle over a local socket), in-process under ``Gateway.to_asgi()``. A family's modules, and
the heavy libraries they bring (torch, openai-whisper), are imported only when it is served.
Each route is tagged with its family; the request metrics read the route-to-family map from
those tags.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

import bentoml
from fastapi import FastAPI, File, Form, Query, UploadFile
from starlette.responses import Response

from configuration.profiles import Family, model_spec
from configuration.settings import get_settings
from services.common import metrics
from services.common.auth import APIKeyMiddleware, document_bearer_auth
from services.llava.protocol import ChatCompletionRequest
from services.common.errors import APIError, document_errors_truthfully, error_response, error_responses, install_error_handlers
from services.common.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware
from services.common.pixel_budget import PixelBudget
from services.common.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Granularity,
    HealthResponse,
    ModelList,
    ModelObject,
    NotReadyResponse,
    ReadyResponse,
    ResponseFormat,
    SearchRequest,
    SearchResponse,
    TranscribeResponse,
    TranscriptionResponse,
    TranscriptionVerboseResponse,
)

log = logging.getLogger(__name__)
settings = get_settings()
# Families are asked at once, each within this: one hung service cannot hold the probe past a kubelet's timeout.
READY_TIMEOUT_SECONDS = 5.0
if "clip" in settings.families:
    from services.clip.cache import build_cache
    from services.clip.service import CLIP
    from services.clip.api import ClipAPI
    from services.clip.embedder import ClipEmbedder
if "llava" in settings.families:
    from services.llava.api import LlavaAPI
    from services.llava.service import LLaVA
if "whisper" in settings.families:
    from services.whisper.service import Whisper
    from services.whisper.api import WhisperAPI

app = FastAPI(title="Multimodal serving", description="CLIP, LLaVA and Whisper behind one API.")
install_error_handlers(app)
document_errors_truthfully(app)
# What every model route may answer besides 200.
MODEL_ROUTE_ERRORS = error_responses(400, 404, 413, 429, 503, 504)
AUDIO_ROUTE_ERRORS = error_responses(400, 404, 413, 415, 429, 503, 504)
# The audio routes answer JSON or, by `response_format`, plain text, SRT or WebVTT.
AUDIO_RESPONSES: dict[int | str, dict] = {
    **AUDIO_ROUTE_ERRORS,
    200: {
        "model": TranscriptionResponse | TranscriptionVerboseResponse,
        "description": "`json` and `verbose_json` as JSON; `text` and `srt` as text/plain; `vtt` as text/vtt.",
        "content": {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}},
    },
}
CHAT_RESPONSES: dict[int | str, dict] = {
    **MODEL_ROUTE_ERRORS,
    200: {
        "description": "A chat completion; with `stream: true`, server-sent events (`data: {...}` lines, then `data: [DONE]`).",
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    },
}


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="Gateway", workers=settings.gateway_workers, traffic={"timeout": settings.request_timeout_seconds})
class Gateway:
    # Only the enabled families' services are started (MULTIMODAL_FAMILIES), so a deployment
    # without a GPU for LLaVA, say, serves CLIP and Whisper alone.
    if "clip" in settings.families:
        clip = bentoml.depends(CLIP)
    if "llava" in settings.families:
        llava = bentoml.depends(LLaVA)
    if "whisper" in settings.families:
        whisper = bentoml.depends(Whisper)

    def __init__(self) -> None:
        self.families: dict[str, Any] = {}  # family -> its route logic (ClipAPI, ...)
        # One budget per worker process, shared by CLIP and chat images: both decode pixels.
        pixels = PixelBudget(settings.max_request_pixels, settings.max_pixels_in_flight)
        if "clip" in settings.families:
            self.embedder = ClipEmbedder(self.clip, build_cache(settings), settings)
            self.families["clip"] = ClipAPI(self.embedder, settings, pixels, CLIP.url)
        if "llava" in settings.families:
            self.families["llava"] = LlavaAPI(settings, model_spec("llava").tag, LLaVA.url, pixels)
        if "whisper" in settings.families:
            self.families["whisper"] = WhisperAPI(self.whisper, settings, Whisper.url)

    def _family(self, name: str) -> Any:
        api = self.families.get(name)
        if api is None:
            raise APIError(404, f"this deployment does not serve {name} (MULTIMODAL_FAMILIES)", code="not_served")
        return api

    # CLIP

    @app.post("/search", response_model_exclude_none=True, tags=["clip"], responses=MODEL_ROUTE_ERRORS)
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Rank texts by cosine similarity to an image."""
        return await self._family("clip").search(request)

    @app.post("/classify", tags=["clip"], responses=MODEL_ROUTE_ERRORS)
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """Zero-shot classification: softmax over CLIP's scaled image-text logits."""
        return await self._family("clip").classify(request)

    @app.post("/v1/embeddings", tags=["clip"], responses=MODEL_ROUTE_ERRORS)
    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI-compatible embeddings of texts, and of images given as base64 ``data:`` URLs."""
        return await self._family("clip").embeddings(request)

    # LLaVA

    @app.post("/v1/chat/completions", response_model=None, tags=["llava"], responses=CHAT_RESPONSES)
    async def chat_completions(self, request: ChatCompletionRequest) -> Response:
        """OpenAI-compatible chat with images (LLaVA through vLLM), streamed or not."""
        return await self._family("llava").chat(request)

    # Whisper (multipart uploads, as OpenAI's audio API takes them)

    @app.post("/v1/audio/transcriptions", response_model=None, tags=["whisper"], responses=AUDIO_RESPONSES)
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
        whisper = self._family("whisper")
        return await whisper.openai(
            "transcribe", file, model, language, prompt, response_format, temperature, timestamp_granularities
        )

    @app.post("/v1/audio/translations", response_model=None, tags=["whisper"], responses=AUDIO_RESPONSES)
    async def audio_translations(
        self,
        file: Annotated[UploadFile, File(description="The audio: wav, flac, mp3, ogg, m4a/mp4, webm, aac.")],
        model: Annotated[str, Form()],
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[ResponseFormat, Form()] = "json",
        temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
    ) -> Response:
        """OpenAI-compatible speech to English text (Whisper's translate task)."""
        whisper = self._family("whisper")
        return await whisper.openai("translate", file, model, None, prompt, response_format, temperature, None)

    @app.post("/transcribe", tags=["whisper"], responses=AUDIO_ROUTE_ERRORS)
    async def transcribe(
        self,
        audio: Annotated[UploadFile | None, File(description="The audio: wav, flac, mp3, ogg, m4a/mp4, webm, aac.")] = None,
        file: Annotated[UploadFile | None, File(description="The same, under OpenAI's field name.")] = None,
        language: Annotated[str | None, Form(description="ISO 639-1 code; detected when unset.")] = None,
    ) -> TranscribeResponse:
        """Upload audio (field `audio`, as the original design names it, or `file`), get its text and language."""
        upload = audio or file
        if upload is None:
            raise APIError(400, "upload the audio in the multipart field `audio` (or `file`)", code="missing_file", param="audio")
        return await self._family("whisper").transcribe_upload(upload, language)

    # Every family

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        ids = [model_id for api in self.families.values() for model_id in await api.model_ids()]
        return ModelList(data=[ModelObject(id=model_id) for model_id in ids])

    @app.get("/health")
    async def health(self) -> HealthResponse:
        """Liveness: answers without calling any model service."""
        card = self.embedder.known_card if "clip" in self.families else None
        return HealthResponse(device=card.device if card else settings.device)

    @app.get(
        "/ready",
        response_model=ReadyResponse,
        responses={
            **error_responses(400, 404),
            503: {"model": NotReadyResponse, "description": "Not ready: the families asked about, each true or false."},
        },
    )
    async def ready(
        self,
        family: Annotated[
            list[Family] | None,
            Query(description="Families to ask about (repeat the parameter for several); every served family when unset."),
        ] = None,
        require: Annotated[
            Literal["all", "any"], Query(description="`all`: ready when every family asked about is; `any`: when one is.")
        ] = "all",
    ) -> ReadyResponse | Response:
        """Readiness per family: each family's model service answers ready; 200 or 503 by `require`."""
        names = list(dict.fromkeys(family or self.families))
        for name in names:
            self._family(name)  # 404 for a family this deployment does not serve
        states = dict(zip(names, await asyncio.gather(*(self._family_ready(name) for name in names)), strict=True))
        if all(states.values()) if require == "all" else any(states.values()):
            return ReadyResponse(families=states)
        down = ", ".join(name for name, up in states.items() if not up)
        return error_response(503, f"not ready: {down}", code="not_ready", extra={"families": states})

    async def _family_ready(self, name: str) -> bool:
        try:
            await asyncio.wait_for(self.families[name].ready(), timeout=READY_TIMEOUT_SECONDS)
        except Exception as exc:  # any failure, a timeout included, means not ready
            log.info("%s not ready: %r", name, exc)
            return False
        return True


# Request metrics by family, read from the routes' tags (added here, after the routes exist;
# Starlette builds its middleware stack at the first request).
ROUTE_FAMILIES = {route.path: route.tags[0] for route in app.routes if getattr(route, "tags", None)}
app.add_middleware(metrics.RequestMetricsMiddleware, families=ROUTE_FAMILIES)
app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)

# Optional API keys (services/auth.py): on the whole BentoML app, so that /metrics and BentoML's own
# routes are covered too, not only the FastAPI routes.
if api_keys := settings.all_api_keys():
    Gateway.add_asgi_middleware(APIKeyMiddleware, keys=api_keys, metrics_open=settings.metrics_open)
    document_bearer_auth(app, APIKeyMiddleware.open_paths_for(settings.metrics_open))
