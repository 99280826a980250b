"""Overload at twice capacity on a real ``bentoml serve``: the excess is refused with 429 and
``Retry-After`` in the error shape, accepted requests complete, and probes keep answering.

Capacity here is the entry service's in-flight limit (``MULTIMODAL_MAX_CONCURRENT_REQUESTS``) on
one worker; twice as many closed-loop clients send photographs to ``/v1/embeddings`` for a few
seconds, bounded in count and time. How fast a 429 comes back is a benchmark figure
(``bench/soak.py --burst``), not asserted here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from tests.helpers import data_url, jpeg_bytes, photograph

pytestmark = pytest.mark.integration

CAPACITY = 4


@pytest.fixture(scope="module")
def server(serve_product):
    return serve_product(
        MULTIMODAL_FAMILIES="clip",
        MULTIMODAL_GATEWAY_WORKERS="1",
        MULTIMODAL_MAX_CONCURRENT_REQUESTS=str(CAPACITY),
        MULTIMODAL_CACHE_BACKEND="none",  # every request reaches the model, so requests overlap
    )


def test_twice_capacity_gets_429_with_retry_after_and_probes_keep_answering(server) -> None:
    photo = data_url(jpeg_bytes(photograph("astronaut.png"), (640, 480)), "image/jpeg")
    body = {"model": "clip", "input": [photo] * 16}
    statuses: Counter[int] = Counter()
    refusals: list[httpx.Response] = []
    probes: Counter[int] = Counter()
    stop = time.monotonic() + 5.0

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(500):  # bounded in count as well as time
            if time.monotonic() > stop:
                return
            response = await http.post("/v1/embeddings", json=body)
            statuses[response.status_code] += 1
            if response.status_code == 429:
                refusals.append(response)

    async def prober(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            for path in ("/health", "/ready"):
                probes[(await http.get(path)).status_code] += 1
            await asyncio.sleep(0.1)

    async def load() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            await asyncio.gather(*(client(http) for _ in range(2 * CAPACITY)), prober(http))

    asyncio.run(load())
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, statuses
    for refused in refusals:
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(probes) == {200} and sum(probes.values()) > 10, probes
