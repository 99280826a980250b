"""The API-key middleware on its own: which paths are open, how keys are compared, the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from configuration.settings import Settings
from services.common.auth import APIKeyMiddleware


def client(metrics_open: bool = True) -> TestClient:
    async def ok(_request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route(path, ok) for path in ("/search", "/metrics", "/health", "/livez", "/readyz", "/ready")]
    )
    return TestClient(APIKeyMiddleware(app, keys=["k1", "k2"], metrics_open=metrics_open))


@pytest.mark.parametrize("metrics_open", [True, False])
def test_probes_are_open_and_metrics_follow_the_setting(metrics_open):
    test_client = client(metrics_open)
    for path in ("/health", "/livez", "/readyz", "/ready"):
        assert test_client.get(path).status_code == 200
    assert test_client.get("/metrics").status_code == (200 if metrics_open else 401)
    assert test_client.get("/search").status_code == 401


def test_any_configured_key_opens_and_nothing_else_does():
    test_client = client()
    assert test_client.get("/search", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert test_client.get("/search", headers={"Authorization": "Bearer k2"}).status_code == 200
    for value in ("Bearer k3", "Bearer k", "Bearer k11", "Token k1", "k1", "Bearer", ""):
        response = test_client.get("/search", headers={"Authorization": value})
        assert response.status_code == 401, value
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_non_ascii_header_is_refused_not_an_error():
    response = client().get("/search", headers={"Authorization": "Bearer k\u00e9".encode("latin-1")})
    assert response.status_code == 401


def test_no_keys_is_a_configuration_error_not_an_open_api():
    with pytest.raises(ValueError):
        APIKeyMiddleware(lambda *args: None, keys=[])


def test_keys_come_from_the_variable_and_the_file(tmp_path: Path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\n\n  file-key \n")
    monkeypatch.setenv("MULTIMODAL_API_KEYS", "a, b,,")
    monkeypatch.setenv("MULTIMODAL_API_KEYS_FILE", str(keys_file))
    settings = Settings()
    assert settings.all_api_keys() == ["a", "b", "file-key"]
    assert "file-key" not in repr(settings) and "'a'" not in repr(settings)
    assert Settings(api_keys=[], api_keys_file=None).all_api_keys() == [] and Settings().metrics_open is True
