"""The LLaVA route's logic: OpenAI chat completions, checked here and answered by vLLM.

Requests are validated and every image is made safe before anything reaches vLLM: ``data:``
URLs are decoded and checked (format, bytes, pixels), http(s) URLs are fetched by
``services.common.image_fetch`` when enabled, and vLLM receives only ``data:`` URLs. The images' pixels are
checked against the request's and the process's pixel budgets (``services.common.pixel_budget``) from
their headers before any is decoded, and stay reserved until vLLM has answered (vLLM decodes each
image at full size before its processor resizes it to 336x336). The request then goes
as plain HTTP through the LLaVA service's socket to vLLM's own OpenAI server, so that vLLM's
answers (status, body, server-sent events) pass through unchanged, except errors, which are
put into the product's one error shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from configuration.settings import Settings
from services.common import metrics
from services.common.errors import APIError, check_model, error_response
from services.common.image_fetch import ImageFetcher
from services.common.image_validation import (
    EncodedImage,
    ImageReader,
    decode_base64,
    is_data_url,
    verified_data_url,
)
from services.common.pixel_budget import PixelBudget
from services.common.readiness import ReadinessGate, ServiceProbe, dependency_client
from services.llava.protocol import ChatCompletionRequest, ImagePart, TextPart

# LLaVA-1.5's image placeholder: typed by a user it would claim image slots that no image
# fills, so it is removed from text (the chat template inserts one per image part).
IMAGE_PLACEHOLDER = "<image>"


def without_placeholders(text: str) -> str:
    """``text`` with no image placeholder left: one pass would turn ``<<image>image>`` into one."""
    while IMAGE_PLACEHOLDER in text:
        text = text.replace(IMAGE_PLACEHOLDER, "")
    return text


def _engine_error(status: int, body: bytes) -> Response:
    """vLLM's (or BentoML's proxy's) error, in our shape; the status is kept."""
    message = body.decode(errors="replace").strip() or f"HTTP {status}"
    param = None
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed)
        message, param = error.get("message", message), error.get("param")
    except (ValueError, AttributeError):
        pass
    if "context length" in message or "maximum model length" in message or "max_model_len" in message:
        code = "context_length_exceeded"
    else:
        code = "overloaded" if status == 503 else "engine_error"
    return error_response(status, message, code=code, param=param)


class LlavaAPI:
    def __init__(self, settings: Settings, model_id: str, service_url: str | None, pixels: PixelBudget) -> None:
        self.settings, self.model_id, self.pixels = settings, model_id, pixels
        self.images = ImageReader(settings)
        self.fetcher = ImageFetcher(settings)
        self._client = dependency_client(service_url, settings.request_timeout_seconds)
        self._probe = ServiceProbe("LLaVA", service_url)
        self._gate = ReadinessGate(self._probe)

    async def model_ids(self) -> list[str]:
        return [self.model_id]

    async def ready(self) -> None:
        """Raises unless the LLaVA service reports its engine ready."""
        if not self._probe.separate:  # chat needs vLLM's server: never ready in-process
            raise RuntimeError("LLaVA service not reachable")
        await self._probe.check()

    async def chat(self, request: ChatCompletionRequest) -> Response:
        body, images = await self._engine_request(request)
        # Reserved from before the images are decoded (here, then in vLLM) until vLLM's first bytes:
        # vLLM decodes and preprocesses every image before it generates, so once it has answered
        # (the whole body, or a stream's first event) the full-size pixels are gone. Released in
        # this coroutine, so a client that goes away (the task cancelled) releases them too.
        with self.pixels.admit(sum(image.pixels for image in images), param="messages"):
            await self._verify_images(body, images)
            if self._client is None:
                raise APIError(
                    503, "the LLaVA service is not reachable in this mode; use `bentoml serve`", code="not_ready"
                )
            await self._gate.ensure_ready()  # 503 now rather than a wait for a restarting engine
            with metrics.queued("llava"):
                try:
                    response = await self._client.send(
                        self._client.build_request("POST", "/v1/chat/completions", json=body), stream=True
                    )
                except httpx.TimeoutException:
                    raise APIError(504, "the LLaVA engine did not answer in time", code="timeout") from None
                except httpx.TransportError as exc:
                    raise APIError(
                        503, f"the LLaVA engine is unavailable: {exc or type(exc).__name__}", code="overloaded"
                    ) from None
                if response.status_code != 200:
                    error = _engine_error(response.status_code, await response.aread())
                    await response.aclose()
                    return error
                if not request.stream:
                    content = await response.aread()
                    await response.aclose()
                    return Response(content, media_type="application/json")
                chunks = response.aiter_raw()
                try:
                    first = await anext(chunks, b"")
                except BaseException:
                    await response.aclose()
                    raise
        return StreamingResponse(
            self._relay(first, chunks), media_type="text/event-stream", background=BackgroundTask(response.aclose)
        )

    async def _relay(self, first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        with metrics.queued("llava"):
            if first:
                yield first
            async for chunk in chunks:
                yield chunk

    async def _engine_request(self, request: ChatCompletionRequest) -> tuple[dict, list[EncodedImage]]:
        """The body vLLM receives, our limits applied, and its images, their headers checked (not yet
        decoded: ``_verify_images`` does that, inside the pixel reservation)."""
        check_model(request.model, (self.model_id, "llava"))
        images = request.images()
        if len(images) > self.settings.llava_max_images_per_request:
            limit = self.settings.llava_max_images_per_request
            raise APIError(400, f"at most {limit} images per request", code="too_many_images", param="messages")
        max_tokens = request.max_completion_tokens or request.max_tokens or self.settings.llava_max_tokens
        if max_tokens > self.settings.llava_max_tokens:
            limit = self.settings.llava_max_tokens
            raise APIError(400, f"max_tokens is limited to {limit}", code="invalid_value", param="max_tokens")
        checked: list[EncodedImage] = []
        for message in request.messages:
            if isinstance(message.content, str):
                message.content = without_placeholders(message.content)
                continue
            for part in message.content:
                if isinstance(part, TextPart):
                    part.text = without_placeholders(part.text)
                elif isinstance(part, ImagePart):
                    checked.append(await self._checked_image(part.image_url.url))
        self.pixels.check_request(sum(image.pixels for image in checked), param="messages")
        body = request.model_dump(exclude_none=True, exclude={"max_completion_tokens"})
        return {**body, "model": self.model_id, "max_tokens": max_tokens}, checked

    async def _checked_image(self, url: str) -> EncodedImage:
        """The image's bytes, its format, size and pixels per byte checked from its header."""
        param = "image_url"
        if is_data_url(url):
            data = decode_base64(url, param=param, max_bytes=self.settings.max_image_bytes)
        elif url.startswith(("http://", "https://")):
            data = await self.fetcher.fetch(url)
        else:
            raise APIError(400, "image_url must be a data: URL or an http(s) URL", code="invalid_image", param=param)
        return self.images.check_bytes(data, param)

    async def _verify_images(self, body: dict, images: list[EncodedImage]) -> None:
        """Decode each image once (so vLLM never receives one that fails) and put it into ``body`` as a
        ``data:`` URL of its real type, in the order the image parts come."""
        # Decoding is CPU work: off the event loop, so other requests keep moving meanwhile.
        urls = iter(
            [
                await asyncio.to_thread(
                    verified_data_url, image, param="image_url", max_pixels=self.settings.max_image_pixels
                )
                for image in images
            ]
        )
        for message in body["messages"]:
            if isinstance(message["content"], list):
                for part in message["content"]:
                    if part.get("type") == "image_url":
                        part["image_url"]["url"] = next(urls)
