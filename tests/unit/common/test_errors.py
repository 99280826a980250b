"""Errors between the entry service and a model service reach clients as 503/504 with Retry-After, never 500."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import numpy as np
import pytest
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.common.errors import APIError, install_error_handlers


def app_raising(exc: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/")
    async def route() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    "exc,status,code",
    [
        (httpx.WriteError("broken pipe"), 503, "unavailable"),
        (httpx.RemoteProtocolError("peer closed connection"), 503, "unavailable"),
        (BrokenPipeError(), 503, "unavailable"),
        (ConnectionResetError(), 503, "unavailable"),
        # BentoML's dependency client is aiohttp: what a model worker killed mid-call raises.
        (aiohttp.ServerDisconnectedError(), 503, "unavailable"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), 503, "unavailable"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), 503, "unavailable"),
        (ServiceUnavailable("process is overloaded"), 503, "overloaded"),
        (APIError(429, "slow down", code="rate_limit_exceeded"), 429, "rate_limit_exceeded"),
    ],
    ids=[
        "write error",
        "protocol error",
        "broken pipe",
        "reset",
        "disconnected",
        "aiohttp reset",
        "cut answer",
        "batcher overloaded",
        "rate limited",
    ],
)
def test_retryable_errors_carry_retry_after(exc, status, code):
    response = app_raising(exc).get("/")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert int(response.headers["retry-after"]) >= 1


def test_a_model_service_timeout_is_504_and_a_client_error_has_no_retry_after():
    response = app_raising(httpx.ReadTimeout("no answer")).get("/")
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    response = app_raising(APIError(400, "bad", code="invalid_value")).get("/")
    assert response.status_code == 400 and "retry-after" not in response.headers


def test_an_aiohttp_timeout_is_504():
    response = app_raising(aiohttp.ServerTimeoutError("no answer")).get("/")
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


def test_an_embedding_call_broken_by_a_dying_worker_is_sent_once_more():
    from services.common.errors import retry_once_on_connection_error

    calls: list[int] = []

    async def call(items: list[str]) -> np.ndarray:
        calls.append(len(items))
        if len(calls) == 1:
            raise aiohttp.ServerDisconnectedError()
        return np.zeros((len(items), 2))

    assert asyncio.run(retry_once_on_connection_error(call)(["a", "b"])).shape == (2, 2)
    assert calls == [2, 2]


def test_a_plain_404_from_an_outer_router_comes_back_in_the_error_shape() -> None:
    # What BentoML's outer router does for a path no route has: Starlette's text/plain 404.
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from services.common.errors import NotFoundInErrorShape, error_response

    async def not_served(request):
        return error_response(404, "this deployment does not serve llava", code="not_served")

    outer = Starlette(routes=[Route("/v1/chat/completions", not_served, methods=["POST"])])
    outer.add_route("/plain", lambda request: PlainTextResponse("ok"))
    client = TestClient(NotFoundInErrorShape(outer))

    unknown = client.post("/v2/embeddings", json={"input": "a"})
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"
    assert unknown.json() == {
        "error": {"message": "no route /v2/embeddings", "type": "not_found_error", "param": None, "code": "not_found"}
    }
    # A 404 already in the error shape, and any other answer, pass unchanged.
    assert client.post("/v1/chat/completions").json()["error"]["code"] == "not_served"
    assert client.get("/plain").text == "ok"
