"""Per-family readiness: each model service is asked for its own ``/readyz``, through its socket.

A model card, once fetched, says nothing about whether the service is still there: a killed
worker leaves the card cached in the gateway. So readiness asks the service itself every time,
with a short timeout: a dead worker's socket still accepts connections (the arbiter holds it) but
nothing answers, and a timeout is the only way to tell.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import unquote, urlsplit

import httpx

from services.common.errors import APIError

# Below the gateway's own budget for /ready (5 s), so one slow family cannot hide the others' answers.
PROBE_TIMEOUT_SECONDS = 3.0


def dependency_client(service_url: str | None, timeout_seconds: float) -> httpx.AsyncClient | None:
    """An HTTP client to a dependency service: its Unix socket under `bentoml serve`, else its URL."""
    if not service_url:
        return None
    timeout = httpx.Timeout(timeout_seconds, connect=5.0)
    if service_url.startswith("file://"):
        transport = httpx.AsyncHTTPTransport(uds=unquote(urlsplit(service_url).path))
        return httpx.AsyncClient(transport=transport, base_url="http://dependency", timeout=timeout)
    return httpx.AsyncClient(base_url=service_url, timeout=timeout)


class ServiceProbe:
    """Asks one model service's ``/readyz`` (its worker answers and its model or engine is ready)."""

    def __init__(self, name: str, service_url: str | None) -> None:
        self.name = name
        self._client = dependency_client(service_url, PROBE_TIMEOUT_SECONDS)

    @property
    def separate(self) -> bool:
        """False in-process (``Gateway.to_asgi()``): there is no other process to ask."""
        return self._client is not None

    async def check(self) -> None:
        """Raises unless the service answers ready."""
        if self._client is None:
            return
        try:
            response = await self._client.get("/readyz", timeout=PROBE_TIMEOUT_SECONDS)
        except httpx.TimeoutException:
            raise RuntimeError(f"{self.name} service did not answer within {PROBE_TIMEOUT_SECONDS:.0f} s") from None
        except httpx.TransportError as exc:
            raise RuntimeError(f"{self.name} service unreachable ({exc!r})") from None
        if response.status_code != 200:
            raise RuntimeError(f"{self.name} service not ready ({response.status_code})")


class ReadinessGate:
    """Answers 503 at once while a model service is not ready, instead of sending it the request.

    For LLaVA: its worker exits when the engine dies and is respawned, and a request sent meanwhile
    would wait in the socket's backlog until a new engine has started (a minute or more), not fail.
    The probe's answer is kept ``ttl_seconds``, so a busy gateway asks at most once a second, and
    requests arriving together share one probe (at most its 3 s timeout).
    """

    def __init__(self, probe: ServiceProbe, ttl_seconds: float = 1.0) -> None:
        self._probe, self._ttl = probe, ttl_seconds
        self._lock = asyncio.Lock()
        self._checked_until = 0.0
        self._failure: str | None = None

    async def ensure_ready(self) -> None:
        if time.monotonic() >= self._checked_until:
            async with self._lock:
                if time.monotonic() >= self._checked_until:
                    try:
                        await self._probe.check()
                        self._failure = None
                    except Exception as exc:
                        self._failure = str(exc) or type(exc).__name__
                    self._checked_until = time.monotonic() + self._ttl
        if self._failure is not None:
            raise APIError(503, f"{self._failure}; retry later", code="unavailable")
