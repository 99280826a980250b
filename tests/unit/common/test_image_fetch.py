"""SSRF rules of remote image fetching, without the network."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from configuration.settings import Settings
from services.common.errors import APIError
from services.common.image_fetch import ImageFetcher, is_public


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.5.5.5", "10.0.0.1", "172.16.3.4", "192.168.1.1", "169.254.169.254", "100.100.100.200",
        "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd00:ec2::254", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "::127.0.0.1",
    ],
)  # fmt: skip
def test_internal_addresses_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_public(address):
    assert is_public(ipaddress.ip_address(address))


def fetch(settings: Settings, url: str) -> APIError:
    with pytest.raises(APIError) as raised:
        asyncio.run(ImageFetcher(settings).fetch(url))
    return raised.value


def test_fetching_is_off_by_default():
    assert fetch(Settings(), "https://images.example/cat.png").code == "image_url_disabled"


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/", "http:///nohost"])
def test_only_http_and_https_with_a_host(url):
    assert fetch(Settings(image_fetch_enabled=True), url).code == "image_url_forbidden"


@pytest.mark.parametrize(
    "url", ["http://[::1/x", "http://" + "a" * 64 + ".example/cat.png"], ids=["unbalanced bracket", "label over 63"]
)
def test_malformed_urls_and_hosts_are_400(url):
    error = fetch(Settings(image_fetch_enabled=True), url)
    assert error.status == 400 and error.code in ("image_url_forbidden", "image_url_unreachable")


def test_allow_list_is_checked_before_resolving(monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("resolved a host that is not on the allow-list")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    settings = Settings(image_fetch_enabled=True, image_fetch_allowed_hosts=["images.example"])
    assert fetch(settings, "https://evil.example/cat.png").code == "image_url_forbidden"


def test_a_host_name_resolving_to_a_private_address_is_refused(monkeypatch):
    # A stand-in resolver: no DNS server can be reached here, and no real name points into 10/8.
    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 80)),
    ]

    async def resolve(self, host, port, **kwargs):
        assert host == "internal.example"
        return answers

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", resolve)
    error = fetch(Settings(image_fetch_enabled=True), "http://internal.example/cat.png")
    assert error.code == "image_url_forbidden" and "10.1.2.3" in error.message  # one bad answer is enough


def test_trusted_networks_are_the_only_exception():
    settings = Settings(image_fetch_enabled=True, image_fetch_trusted_networks=["127.0.0.2/32"])
    fetcher = ImageFetcher(settings)
    assert fetcher._allowed_address(ipaddress.ip_address("127.0.0.2"))
    assert not fetcher._allowed_address(ipaddress.ip_address("127.0.0.1"))
