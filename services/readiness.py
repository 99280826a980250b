"""Per-family readiness: each model service is asked for its own ``/readyz``, through its socket.

A model card, once fetched, says nothing about whether the service is still there: a killed
worker leaves the card cached in the gateway. So readiness asks the service itself every time,
with a short timeout: a dead worker's socket still accepts connections (the arbiter holds it) but
nothing answers, and a timeout is the only way to tell.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import httpx

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
