"""Entry service: the public HTTP API, composing the model services.

Routes are a FastAPI app mounted on the BentoML service so that every route, native or
OpenAI-compatible, answers errors in one JSON shape (``services.errors``). The model services
are BentoML dependencies: separate processes under ``bentoml serve`` (pickle over a local
socket), in-process under ``Gateway.to_asgi()``.
"""

from __future__ import annotations

import asyncio
import base64
import logging

import bentoml
import numpy as np
from fastapi import FastAPI

from configuration.settings import get_settings
from services import metrics
from services.cache import build_cache
from services.clip import CLIP
from services.embeddings import ClipEmbedder
from services.errors import APIError, error_response, install_error_handlers
from services.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware
from services.media import decode_image, is_data_url
from services.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    HealthResponse,
    LabelProbability,
    ReadyResponse,
    SearchEmbeddings,
    SearchRequest,
    SearchResponse,
    Usage,
)

log = logging.getLogger(__name__)
settings = get_settings()

CLIP_ROUTES = frozenset({"/search", "/classify", "/v1/embeddings"})

app = FastAPI(title="Multimodal serving", description="CLIP, LLaVA and Whisper behind one API.")
install_error_handlers(app)
app.add_middleware(metrics.RequestMetricsMiddleware, endpoints=CLIP_ROUTES)
app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)


def _check_texts(texts: list[str], param: str) -> None:
    if len(texts) > settings.max_inputs_per_request:
        raise APIError(400, f"at most {settings.max_inputs_per_request} inputs per request", code="too_many_inputs", param=param)
    for i, text in enumerate(texts):
        if not text.strip():
            raise APIError(400, "text inputs must not be empty", code="invalid_value", param=f"{param}[{i}]")
        if len(text) > settings.max_text_chars:
            raise APIError(400, f"text inputs are limited to {settings.max_text_chars} characters", code="text_too_long", param=f"{param}[{i}]")


def _decode(value: str, param: str):
    return decode_image(value, param=param, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="Gateway", traffic={"timeout": settings.request_timeout_seconds})
class Gateway:
    clip = bentoml.depends(CLIP)

    def __init__(self) -> None:
        self.embedder = ClipEmbedder(self.clip, build_cache(settings), settings)

    @app.post("/search", response_model_exclude_none=True)
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Rank texts by cosine similarity to an image."""
        _check_texts(request.texts, "texts")
        image = _decode(request.image_data, "image_data")
        image_vectors, text_vectors = await asyncio.gather(
            self.embedder.embed_images([image.image], [image.sha256]), self.embedder.embed_texts(request.texts)
        )
        similarities = text_vectors @ image_vectors[0]
        for score in similarities:
            metrics.SIMILARITY.observe(float(score))
        best = int(np.argmax(similarities))
        return SearchResponse(
            similarities=similarities.tolist(),
            best_match=request.texts[best],
            best_similarity=float(similarities[best]),
            embeddings=SearchEmbeddings(image=image_vectors[0].tolist(), texts=text_vectors.tolist())
            if request.return_embeddings
            else None,
        )

    @app.post("/classify")
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """Zero-shot classification: softmax over CLIP's scaled image-text logits."""
        if "{}" not in request.template:
            raise APIError(400, "template must contain {} where the label goes", code="invalid_value", param="template")
        _check_texts(request.labels, "labels")
        image = _decode(request.image_data, "image_data")
        prompts = [request.template.replace("{}", label) for label in request.labels]
        card, image_vectors, text_vectors = await asyncio.gather(
            self.embedder.card(),
            self.embedder.embed_images([image.image], [image.sha256]),
            self.embedder.embed_texts(prompts),
        )
        probabilities = _softmax(card.logit_scale * (text_vectors @ image_vectors[0]))
        ranked = sorted(zip(request.labels, probabilities.tolist()), key=lambda pair: -pair[1])
        return ClassifyResponse(
            predictions=[LabelProbability(label=label, probability=p) for label, p in ranked],
            best_label=ranked[0][0],
            best_probability=ranked[0][1],
        )

    @app.post("/v1/embeddings")
    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI-compatible embeddings of texts and of images given as base64 ``data:`` URLs."""
        card = await self.embedder.card()
        if request.model not in (card.model, "clip"):
            raise APIError(404, f"model {request.model!r} does not exist; see /v1/models", code="model_not_found", param="model")
        if request.dimensions is not None and request.dimensions != card.embedding_dim:
            raise APIError(400, f"{card.model} embeddings have {card.embedding_dim} dimensions", code="invalid_value", param="dimensions")
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise APIError(400, "input must not be empty", code="invalid_value", param="input")
        image_at = [i for i, value in enumerate(inputs) if is_data_url(value)]
        text_at = [i for i, value in enumerate(inputs) if not is_data_url(value)]
        texts = [inputs[i] for i in text_at]
        if len(inputs) > settings.max_inputs_per_request:
            raise APIError(400, f"at most {settings.max_inputs_per_request} inputs per request", code="too_many_inputs", param="input")
        _check_texts(texts, "input")
        images = [_decode(inputs[i], f"input[{i}]") for i in image_at]

        vectors = np.empty((len(inputs), card.embedding_dim), dtype=np.float32)
        tokens = 0
        if images:
            vectors[image_at] = await self.embedder.embed_images([im.image for im in images], [im.sha256 for im in images])
        if texts:
            text_vectors, counts = await asyncio.gather(self.embedder.embed_texts(texts), self.embedder.count_tokens(texts))
            vectors[text_at] = text_vectors
            tokens = sum(counts)

        def encode(vector: np.ndarray) -> list[float] | str:
            if request.encoding_format == "base64":
                return base64.b64encode(vector.astype("<f4").tobytes()).decode()
            return vector.tolist()

        return EmbeddingsResponse(
            data=[EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
            model=card.model,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    @app.get("/v1/models")
    async def models(self) -> dict:
        card = await self.embedder.card()
        return {"object": "list", "data": [{"id": card.model, "object": "model", "owned_by": "multimodal", "created": 0}]}

    @app.get("/health")
    async def health(self) -> HealthResponse:
        """Liveness: answers without calling any model service."""
        known = self.embedder.known_card
        return HealthResponse(device=known.device if known else settings.device)

    @app.get("/ready", response_model=ReadyResponse)
    async def ready(self):
        """Readiness: the model services answer."""
        try:
            await asyncio.wait_for(self.embedder.card(), timeout=5)
        except Exception as exc:
            return error_response(503, f"not ready: {exc or type(exc).__name__}", code="not_ready")
        return ReadyResponse()
