"""The LLaVA route's logic: OpenAI chat completions, checked here and answered by vLLM.

Requests are validated and every image is made safe before anything reaches vLLM: ``data:``
URLs are decoded and checked (format, bytes, pixels), http(s) URLs are fetched by
``services.fetch`` when enabled, and vLLM receives only ``data:`` URLs. The request then goes
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
from services import metrics
from services.chat_schemas import ChatCompletionRequest, ImagePart, TextPart
from services.errors import APIError, check_model, error_response
from services.fetch import ImageFetcher
from services.media import checked_data_url, decode_base64, is_data_url
from services.readiness import ReadinessGate, ServiceProbe, dependency_client

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
    def __init__(self, settings: Settings, model_id: str, service_url: str | None) -> None:
        self.settings, self.model_id = settings, model_id
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
        body = await self._engine_request(request)
        if self._client is None:
            raise APIError(503, "the LLaVA service is not reachable in this mode; use `bentoml serve`", code="not_ready")
        await self._gate.ensure_ready()  # 503 now rather than a wait for a restarting engine
        with metrics.queued("llava"):
            try:
                response = await self._client.send(self._client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
            except httpx.TimeoutException:
                raise APIError(504, "the LLaVA engine did not answer in time", code="timeout") from None
            except httpx.TransportError as exc:
                raise APIError(503, f"the LLaVA engine is unavailable: {exc or type(exc).__name__}", code="overloaded") from None
            if response.status_code != 200:
                error = _engine_error(response.status_code, await response.aread())
                await response.aclose()
                return error
            if not request.stream:
                content = await response.aread()
                await response.aclose()
                return Response(content, media_type="application/json")
        return StreamingResponse(
            self._relay(response), media_type="text/event-stream", background=BackgroundTask(response.aclose)
        )

    async def _relay(self, response: httpx.Response) -> AsyncIterator[bytes]:
        with metrics.queued("llava"):
            async for chunk in response.aiter_raw():
                yield chunk

    async def _engine_request(self, request: ChatCompletionRequest) -> dict:
        """The body vLLM receives: our limits applied, every image a checked data: URL."""
        check_model(request.model, (self.model_id, "llava"))
        images = request.images()
        if len(images) > self.settings.llava_max_images_per_request:
            limit = self.settings.llava_max_images_per_request
            raise APIError(400, f"at most {limit} images per request", code="too_many_images", param="messages")
        max_tokens = request.max_completion_tokens or request.max_tokens or self.settings.llava_max_tokens
        if max_tokens > self.settings.llava_max_tokens:
            limit = self.settings.llava_max_tokens
            raise APIError(400, f"max_tokens is limited to {limit}", code="invalid_value", param="max_tokens")
        for message in request.messages:
            if isinstance(message.content, str):
                message.content = without_placeholders(message.content)
                continue
            for part in message.content:
                if isinstance(part, TextPart):
                    part.text = without_placeholders(part.text)
                elif isinstance(part, ImagePart):
                    part.image_url.url = await self._safe_data_url(part.image_url.url)
        body = request.model_dump(exclude_none=True, exclude={"max_completion_tokens"})
        return {**body, "model": self.model_id, "max_tokens": max_tokens}

    async def _safe_data_url(self, url: str) -> str:
        param = "image_url"
        if is_data_url(url):
            data = decode_base64(url, param=param, max_bytes=self.settings.max_image_bytes)
        elif url.startswith(("http://", "https://")):
            data = await self.fetcher.fetch(url)
        else:
            raise APIError(400, "image_url must be a data: URL or an http(s) URL", code="invalid_image", param=param)
        # Decoding is CPU work: off the event loop, so other requests keep moving meanwhile.
        return await asyncio.to_thread(checked_data_url, data, param=param, max_pixels=self.settings.max_image_pixels)
