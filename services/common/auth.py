"""Optional API keys: ``Authorization: Bearer <key>`` on every route but the probes.

An ASGI middleware on the whole entry service (``Gateway.add_asgi_middleware``), not only on its
FastAPI app, so that BentoML's own routes (``/metrics``, ``/docs``, ``/schema.json``) are behind
it too. Keys are kept as SHA-256 digests and the offered key's digest is compared with
``hmac.compare_digest`` against every one of them, with no early exit: the time taken says
neither which key matched nor how long the keys are.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.errors import error_response

# Kubernetes probes and BentoML's own probes carry no credentials.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/health", "/ready"})


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class APIKeyMiddleware:
    """401 in the API's error shape, with ``WWW-Authenticate: Bearer``, unless a configured key is presented."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], metrics_open: bool = True) -> None:
        self.app = app
        self.digests = [_digest(key.encode()) for key in keys]
        if not self.digests:
            raise ValueError("APIKeyMiddleware needs at least one key")
        self.open_paths = self.open_paths_for(metrics_open)

    @staticmethod
    def open_paths_for(metrics_open: bool) -> frozenset[str]:
        return OPEN_PATHS | {"/metrics"} if metrics_open else OPEN_PATHS

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        offered = next((value for name, value in headers if name == b"authorization"), b"")
        scheme, _, token = offered.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        digest = _digest(token.strip())
        matched = False
        for known in self.digests:  # every key, always: no early exit to time
            matched |= hmac.compare_digest(digest, known)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or scope["path"] in self.open_paths
            or self.authorized(scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        response = error_response(
            401,
            "a valid API key is required: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def document_bearer_auth(app: FastAPI, open_paths: frozenset[str]) -> None:
    """State the keys in the OpenAPI document: a bearer scheme on every operation but the open ones, and their 401."""
    build = app.openapi
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    unauthorized = {
        "401": {"description": "A valid API key is required (`Authorization: Bearer <key>`).", "content": error}
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path in open_paths:
                        operation["security"] = []
                    else:
                        operation.setdefault("responses", {}).update(unauthorized)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
