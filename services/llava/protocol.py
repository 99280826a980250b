"""OpenAI chat-completions request model, as much of it as LLaVA serves.

Validated at the edge, so that malformed requests get our error shape before anything reaches
vLLM; vLLM's own protocol models (``vllm/entrypoints/openai/protocol.py``) validate again.
Responses are vLLM's, passed through unchanged.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from services.common.schemas import StrictRequest


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class ImageURL(StrictRequest):
    url: str = Field(description="A base64 `data:image/...` URL, or http(s) where remote fetching is enabled.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(StrictRequest):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(StrictRequest):
    include_usage: bool = False


class ChatCompletionRequest(StrictRequest):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None

    def images(self) -> list[ImagePart]:
        return [
            part for message in self.messages if not isinstance(message.content, str)
            for part in message.content if isinstance(part, ImagePart)
        ]  # fmt: skip
