"""One error shape on every route: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

The HTTP status carries the class of the error; ``type`` follows OpenAI's names so the
official SDKs raise their matching exception classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, ParamSpec, TypeVar

import aiohttp
import httpx
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error meant for the client: raise it anywhere below a route."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# A broken connection to a model service, as each client raises it: BentoML's dependency client is
# aiohttp (a worker killed mid-call is ServerDisconnectedError or ClientOSError, neither of them a
# ConnectionError; one killed while answering leaves ClientPayloadError); the LLaVA route's client is httpx.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    httpx.TransportError,
    ConnectionError,
)


def is_timeout(exc: BaseException) -> bool:
    """A connection error that is really a timeout: 504, and not worth a retry."""
    return isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError | TimeoutError)


P = ParamSpec("P")
R = TypeVar("R")


def retry_once_on_connection_error(
    call: Callable[P, Awaitable[R]], name: str = "model service"
) -> Callable[P, Awaitable[R]]:
    """For idempotent calls between services (embedding, decoding a window): one that broke on its
    connection (a broken pipe, a reset, a pooled keep-alive connection the server had just closed)
    is sent once more before the error reaches the client (as 503, ``install_error_handlers``)."""

    async def call_with_retry(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await call(*args, **kwargs)
        except CONNECTION_ERRORS as exc:
            if is_timeout(exc):
                raise
            log.warning("%s call failed on its connection (%r); retrying once", name, exc)
            return await call(*args, **kwargs)

    return call_with_retry


def check_model(requested: str, served: tuple[str, ...]) -> None:
    """404 unless ``requested`` names the route's model (its id or one of its aliases)."""
    if requested not in served:
        raise APIError(
            404, f"model {requested!r} does not exist; see /v1/models", code="model_not_found", param="model"
        )


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# Seconds a client should wait before retrying a 429 or a 503: long enough for a batch or two to
# drain, short enough that a retry is not a visible outage.
RETRY_AFTER_SECONDS = 1


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """The one error shape; ``extra`` adds top-level keys beside ``error`` (never replaces it)."""
    body: dict[str, Any] = {
        **(extra or {}),
        "error": {"message": message, "type": _error_type(status), "param": param, "code": code},
    }
    headers = dict(headers or {})
    if status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return JSONResponse(body, status_code=status, headers=headers)


ERROR_MEANINGS = {
    400: "Invalid request: a field, an image or audio that does not decode, text that is not valid Unicode.",
    404: "The model is not served here, or (image library) no such collection.",
    409: "Image library: the collection holds embeddings of another model than this deployment serves.",
    413: "The body, an image or the audio is too large, or a request's images add up to too many pixels.",
    415: "The upload is not audio in an accepted format.",
    429: "Too many requests, image pixels or audio in flight; retry after Retry-After seconds.",
    503: "A model service is overloaded or unreachable; retry after Retry-After seconds.",
    504: "A model service did not answer in time.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: each status it may answer, with the one error model."""
    from services.common.schemas import ErrorResponse

    return {status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


# What every model route may answer besides 200 (the audio routes add 415).
MODEL_ROUTE_ERRORS = error_responses(400, 404, 413, 429, 503, 504)


def document_errors_truthfully(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; this API answers validation errors with
    400 in the error shape and never sends 422, so the document leaves it out."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "form")]
    param = ".".join(location) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        code = "invalid_json" if exc.errors()[0].get("type") == "json_invalid" else "invalid_value"
        return error_response(400, message, code=code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # exc.headers carries Allow on a 405.
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return error_response(exc.status_code, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(BentoMLException)
    async def _dependency(_: Request, exc: BentoMLException) -> JSONResponse:
        # Raised by a model service: a 503 is adaptive batching shedding load, worth a retry.
        status = int(exc.error_code)
        if status >= 500:
            log.warning("model service error %s: %s", status, exc)
        code = "overloaded" if status == 503 else "model_service_error"
        return error_response(status, f"model service: {exc}", code=code)

    @app.exception_handler(httpx.TimeoutException)
    async def _dependency_timeout(_: Request, exc: Exception) -> JSONResponse:
        # httpx's timeouts, and any other is_timeout() finds among the connection errors below.
        log.warning("model service timed out: %r", exc)
        return error_response(504, "model service did not answer in time", code="timeout")

    @app.exception_handler(httpx.TransportError)
    @app.exception_handler(aiohttp.ClientConnectionError)
    @app.exception_handler(aiohttp.ClientPayloadError)
    @app.exception_handler(ConnectionError)
    async def _dependency_unreachable(_: Request, exc: Exception) -> JSONResponse:
        # A broken pipe or reset between services, or a model worker that died mid-call (already
        # retried once where that is safe).
        if is_timeout(exc):
            return await _dependency_timeout(_, exc)
        log.warning("model service connection failed: %r", exc)
        return error_response(503, "model service unavailable; retry later", code="unavailable")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal error", code="internal_error")


class NotFoundInErrorShape:
    """A path no route has is answered by BentoML's outer router, which mounts this API and its
    own routes, with a text/plain 404 of its own. This middleware, around that router, answers
    such a 404 in the one error shape instead; a 404 already in it (``not_served``) passes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_in_error_shape(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 404:
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if not content_type.startswith(b"application/json"):
                    replaced = True
                    response = error_response(404, f"no route {scope['path']}", code="not_found")
                    await response(scope, receive, send)
                    return
            if not replaced:  # the replaced response's own body is dropped
                await send(message)

        await self.app(scope, receive, send_in_error_shape)
