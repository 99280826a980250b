"""Load shedding at the edge: request body size and requests in flight, answered in the API's error shape."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import APIError, error_response


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise APIError(413, self._message(), code="request_too_large")
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    def _too_large(self):
        return error_response(413, self._message(), code="request_too_large")


# Health and readiness probes and metrics scrapes: a busy worker must still answer them, or
# Kubernetes restarts it exactly when it is most needed.
UNLIMITED_PATHS = frozenset({"/health", "/ready", "/livez", "/readyz", "/metrics"})


class ConcurrencyLimitMiddleware:
    """429 once ``max_in_flight`` requests are being served by this worker (probes excepted)."""

    def __init__(self, app: ASGIApp, max_in_flight: int) -> None:
        self.app, self.max_in_flight, self.in_flight = app, max_in_flight, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            response = error_response(429, "too many concurrent requests; retry later", code="rate_limit_exceeded")
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
