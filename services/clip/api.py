"""The CLIP routes' logic: search, zero-shot classification and OpenAI-style embeddings.

``services.clip.routes`` declares the URLs; this is what they do, built by the entry service when
it serves CLIP.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from configuration.settings import Settings
from services.clip.embedder import ClipEmbedder
from services.clip.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    LabelProbability,
    SearchEmbeddings,
    SearchRequest,
    SearchResponse,
    Usage,
)
from services.common import metrics
from services.common.errors import APIError, check_model
from services.common.image_validation import ImageReader, is_image_data_url
from services.common.pixel_budget import PixelBudget
from services.common.readiness import ServiceProbe


def check_text(text: str, param: str, max_chars: int) -> None:
    """A text input to CLIP: not blank, and within the deployment's length limit."""
    if not text.strip():
        raise APIError(400, "text inputs must not be empty", code="invalid_value", param=param)
    if len(text) > max_chars:
        raise APIError(400, f"text inputs are limited to {max_chars} characters", code="text_too_long", param=param)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


class ClipAPI:
    def __init__(
        self, embedder: ClipEmbedder, settings: Settings, pixels: PixelBudget, service_url: str | None = None
    ) -> None:
        self.embedder, self.settings, self.pixels = embedder, settings, pixels
        self.images = ImageReader(settings)
        self._probe = ServiceProbe("CLIP", service_url)

    def _check_count(self, count: int, param: str) -> None:
        if count > self.settings.max_inputs_per_request:
            limit = self.settings.max_inputs_per_request
            raise APIError(400, f"at most {limit} inputs per request", code="too_many_inputs", param=param)

    def _check_texts(self, texts: list[str], param: str) -> None:
        self._check_count(len(texts), param)
        for i, text in enumerate(texts):
            check_text(text, f"{param}[{i}]", self.settings.max_text_chars)

    async def search(self, request: SearchRequest) -> SearchResponse:
        self._check_texts(request.texts, "texts")
        image = self.images.read(request.image_data, "image_data")
        card = await self.embedder.card()  # one model for the image and the texts
        with self.pixels.admit(image.pixels, param="image_data"):
            image_vectors, (text_vectors, _) = await asyncio.gather(
                self.embedder.embed_images([image], ["image_data"], card),
                self.embedder.embed_texts(request.texts, card),
            )
        similarities = text_vectors @ image_vectors[0]
        for score in similarities:
            metrics.SIMILARITY.observe(float(score))
        best = int(np.argmax(similarities))
        embeddings = SearchEmbeddings(image_embedding=image_vectors[0].tolist(), text_embeddings=text_vectors.tolist())
        return SearchResponse(
            similarities=similarities.tolist(),
            best_match=request.texts[best],
            best_similarity=float(similarities[best]),
            embeddings=embeddings if request.return_embeddings else None,
        )

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        if "{}" not in request.template:
            raise APIError(400, "template must contain {} where the label goes", code="invalid_value", param="template")
        self._check_texts(request.labels, "labels")
        image = self.images.read(request.image_data, "image_data")
        prompts = [request.template.replace("{}", label) for label in request.labels]
        card = await self.embedder.card()  # one model for the image, the prompts and the logit scale
        with self.pixels.admit(image.pixels, param="image_data"):
            image_vectors, (text_vectors, _) = await asyncio.gather(
                self.embedder.embed_images([image], ["image_data"], card), self.embedder.embed_texts(prompts, card)
            )
        probabilities = _softmax(card.logit_scale * (text_vectors @ image_vectors[0]))
        ranked = sorted(zip(request.labels, probabilities.tolist(), strict=True), key=lambda pair: -pair[1])
        return ClassifyResponse(
            predictions=[LabelProbability(label=label, probability=p) for label, p in ranked],
            best_label=ranked[0][0],
            best_probability=ranked[0][1],
        )

    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        card = await self.embedder.card()
        check_model(request.model, (card.model, "clip"))
        if request.dimensions is not None and request.dimensions != card.embedding_dim:
            message = f"{card.model} embeddings have {card.embedding_dim} dimensions"
            raise APIError(400, message, code="invalid_value", param="dimensions")
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise APIError(400, "input must not be empty", code="invalid_value", param="input")
        self._check_count(len(inputs), "input")
        is_image = [is_image_data_url(value) for value in inputs]
        image_at = [i for i, image in enumerate(is_image) if image]
        text_at = [i for i, image in enumerate(is_image) if not image]
        texts = [inputs[i] for i in text_at]
        self._check_texts(texts, "input")
        images = [self.images.read(inputs[i], f"input[{i}]") for i in image_at]

        vectors = np.empty((len(inputs), card.embedding_dim), dtype=np.float32)
        tokens = 0
        # Every image counts, cached or not: admission comes before the cache is asked (simple and
        # conservative; a cached image costs no decoding, so this can only refuse early, never admit too much).
        if images:
            with self.pixels.admit(sum(image.pixels for image in images), param="input"):
                vectors[image_at] = await self.embedder.embed_images(images, [f"input[{i}]" for i in image_at], card)
        if texts:
            vectors[text_at], counts = await self.embedder.embed_texts(texts, card)
            tokens = int(counts.sum())

        def encode(vector: np.ndarray) -> list[float] | str:
            if request.encoding_format == "base64":  # what the official SDKs ask for by default
                return base64.b64encode(vector.astype("<f4").tobytes()).decode()
            return vector.tolist()

        return EmbeddingsResponse(
            data=[EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
            model=card.model,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ready(self) -> None:
        await self.embedder.card()
        await self._probe.check()  # the card stays cached after the service is gone

    async def model_ids(self) -> list[str]:
        return [(await self.embedder.card()).model]
