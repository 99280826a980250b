"""Errors between the entry service and a model service reach clients as 503/504 with Retry-After, never 500."""

from __future__ import annotations

import httpx
import pytest
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.errors import APIError, install_error_handlers


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
        (ServiceUnavailable("process is overloaded"), 503, "overloaded"),
        (APIError(429, "slow down", code="rate_limit_exceeded"), 429, "rate_limit_exceeded"),
    ],
    ids=["write error", "protocol error", "broken pipe", "reset", "batcher overloaded", "rate limited"],
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
