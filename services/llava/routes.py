"""The LLaVA family's URL: OpenAI's ``/v1/chat/completions``.

Declared once, on this router, which the entry service mounts; what the route does is
``services.llava.api.LlavaAPI``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.responses import Response

from services.common.errors import MODEL_ROUTE_ERRORS
from services.common.routing import served_family
from services.llava.protocol import ChatCompletionRequest

if TYPE_CHECKING:
    from services.llava.api import LlavaAPI

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **MODEL_ROUTE_ERRORS,
    200: {
        "description": (
            "A chat completion; with `stream: true`, server-sent events (`data: {...}` lines, then `data: [DONE]`)."
        ),
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    },
}

router = APIRouter(tags=["llava"])


def _llava() -> LlavaAPI:
    return served_family("llava")


@router.post("/v1/chat/completions", response_model=None, responses=CHAT_RESPONSES)
async def chat_completions(request: ChatCompletionRequest) -> Response:
    """OpenAI-compatible chat with images (LLaVA through vLLM), streamed or not."""
    return await _llava().chat(request)
