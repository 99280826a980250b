"""Edge limits answer in the API's error shape: body size (declared or chunked) and concurrency."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from services.common.errors import install_error_handlers
from services.common.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware


def make_app(max_bytes: int = 100, max_in_flight: int = 10) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=max_in_flight)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy"}

    @app.get("/slow")
    async def slow() -> dict:
        await asyncio.sleep(0.5)
        return {}

    return app


def test_declared_and_chunked_bodies_over_the_limit_are_413():
    client = TestClient(make_app())
    assert client.post("/echo", content=b"x" * 100).json() == {"size": 100}
    declared = client.post("/echo", content=b"x" * 101)
    chunked = client.post("/echo", content=iter([b"x" * 60, b"x" * 60]))
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


def test_requests_over_the_concurrency_limit_are_429():
    import httpx

    async def scenario():
        transport = httpx.ASGITransport(app=make_app(max_in_flight=2))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(client.get("/slow") for _ in range(4)))

    statuses = sorted(r.status_code for r in asyncio.run(scenario()))
    assert statuses == [200, 200, 429, 429]


def test_excess_requests_get_retry_after_and_probes_are_never_limited():
    import httpx

    async def scenario():
        transport = httpx.ASGITransport(app=make_app(max_in_flight=1))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            slow = asyncio.create_task(client.get("/slow"))
            await asyncio.sleep(0.1)  # the one slot is taken
            answers = await asyncio.gather(client.get("/slow"), *(client.get("/health") for _ in range(3)))
            return [await slow, *answers]

    first, excess, *probes = asyncio.run(scenario())
    assert first.status_code == 200
    assert excess.status_code == 429 and int(excess.headers["retry-after"]) >= 1
    assert [p.status_code for p in probes] == [200, 200, 200]
