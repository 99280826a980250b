"""Fetching remote images without server-side request forgery.

Image URLs are the recurring SSRF hole of VLM servers (vLLM CVE-2025-6242, BentoML
CVE-2025-54381), so remote images are fetched here, never by vLLM, which only ever receives
``data:`` URLs. The rules:

- off unless ``MULTIMODAL_IMAGE_FETCH_ENABLED``; only http(s); host names on an allow-list
  when one is configured;
- the host is resolved once, and *every* address it resolves to must be public (not
  loopback, private, link-local, multicast, reserved, shared or cloud-metadata space; IPv6
  forms that embed an IPv4 address, such as ``::ffff:127.0.0.1``, are judged by that
  address), unless it lies in a network the operator explicitly trusts;
- the connection goes to the address that was checked (a pinned resolver), so a second DNS
  answer cannot swap in another;
- redirects are followed by hand, each hop checked again from scratch, at most a few;
- a total timeout and a byte cap bound the download; the pixel cap is the decoder's.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from configuration.settings import Settings
from services.common.errors import APIError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if address in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in ipaddress.IPv6Network("::/96"):  # deprecated IPv4-compatible form
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    """Reachable on the public internet, and so not one of our neighbours."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not address.is_multicast


class ForbiddenAddress(APIError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            400, f"image URL {url!r} is not allowed: {reason}", code="image_url_forbidden", param="image_url"
        )


class _PinnedResolver(AbstractResolver):
    """Answers only with the addresses already checked for this one host."""

    def __init__(self, host: str, results: list[ResolveResult]) -> None:
        self._host, self._results = host, results

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"unexpected host {host!r}")
        return self._results

    async def close(self) -> None:
        return None


class ImageFetcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._allowed_hosts = {h.lower() for h in settings.image_fetch_allowed_hosts}
        self._trusted_networks = [ipaddress.ip_network(n) for n in settings.image_fetch_trusted_networks]

    def _check_url(self, url: str) -> tuple[str, int]:
        try:
            parts = urlsplit(url)
        except ValueError:  # an unbalanced IPv6 bracket, say
            raise ForbiddenAddress(url, "malformed URL") from None
        if parts.scheme not in ("http", "https"):
            raise ForbiddenAddress(url, "only http and https URLs are fetched")
        host = (parts.hostname or "").lower()
        if not host:
            raise ForbiddenAddress(url, "no host")
        if self._allowed_hosts and host not in self._allowed_hosts:
            raise ForbiddenAddress(url, "host is not on the allow-list")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ForbiddenAddress(url, "invalid port") from None
        return host, port

    def _allowed_address(self, address: Address) -> bool:
        return is_public(address) or any(address in network for network in self._trusted_networks)

    async def _resolve_checked(self, url: str, host: str, port: int) -> list[ResolveResult]:
        import asyncio

        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):  # UnicodeError: a label IDNA refuses (over 63 characters, say)
            raise APIError(
                400, f"image URL host {host!r} does not resolve", code="image_url_unreachable", param="image_url"
            ) from None
        results: list[ResolveResult] = []
        for family, _, proto, _, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # an IPv6 one may end in %scope
            if not self._allowed_address(address):
                raise ForbiddenAddress(url, f"{host} resolves to non-public address {address}")
            results.append(
                ResolveResult(
                    hostname=host, host=str(address), port=port, family=family, proto=proto, flags=socket.AI_NUMERICHOST
                )
            )
        return results

    async def fetch(self, url: str) -> bytes:
        """The bytes at ``url``, or a 4xx APIError."""
        if not self.settings.image_fetch_enabled:
            raise APIError(
                400,
                "remote image URLs are disabled; send the image as a base64 data: URL",
                code="image_url_disabled",
                param="image_url",
            )
        timeout = aiohttp.ClientTimeout(total=self.settings.image_fetch_timeout_seconds)
        for _ in range(self.settings.image_fetch_max_redirects + 1):
            host, port = self._check_url(url)
            resolver = _PinnedResolver(host, await self._resolve_checked(url, host, port))
            connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=1)
            try:
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session,
                    session.get(url, allow_redirects=False) as response,
                ):
                    if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise APIError(
                            400,
                            f"image URL answered HTTP {response.status}",
                            code="image_url_unreachable",
                            param="image_url",
                        )
                    return await self._read_capped(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise APIError(
                    400,
                    f"image URL could not be fetched: {exc or type(exc).__name__}",
                    code="image_url_unreachable",
                    param="image_url",
                ) from None
        raise APIError(400, "image URL redirects too often", code="image_url_unreachable", param="image_url")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self.settings.max_image_bytes
        if (response.content_length or 0) > cap:
            raise APIError(413, f"image is larger than {cap} bytes", code="image_too_large", param="image_url")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > cap:
                raise APIError(413, f"image is larger than {cap} bytes", code="image_too_large", param="image_url")
        return bytes(body)
