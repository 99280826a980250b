"""Optional API keys (services/common/auth.py) on a real ``bentoml serve``, with the official ``openai`` SDK."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import b64, png_bytes, random_image

pytestmark = pytest.mark.integration
KEYS = ("sk-first-0123456789", "sk-second-abcdefghij")
FILE_KEY = "sk-from-the-file-42"
PROBES = ("/livez", "/readyz", "/health", "/ready")


@pytest.fixture(scope="module")
def server(serve_product, tmp_path_factory):
    keys_file: Path = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys_file.write_text(f"# one key a line, as a mounted Secret\n\n  {FILE_KEY}  \n")
    return serve_product(
        MULTIMODAL_FAMILIES="clip",
        MULTIMODAL_API_KEYS=",".join(KEYS),
        MULTIMODAL_API_KEYS_FILE=str(keys_file),
        MULTIMODAL_METRICS_OPEN="false",
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {
            "message": "a valid API key is required: send `Authorization: Bearer <key>`",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_every_route_needs_a_key(server):
    document = httpx.get(f"{server.url}/openapi.json", headers=bearer(KEYS[0]), timeout=30).json()
    routes = [(method, path) for path, operations in document["paths"].items() for method in operations]
    routes += [
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
        ("get", "/"),
        ("post", "/no/such/route"),
    ]
    for method, path in routes:
        if path in PROBES:
            continue
        assert_unauthorized(httpx.request(method.upper(), f"{server.url}{path}", json={}, timeout=30))


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer sk-wrong",
        f"Basic {KEYS[0]}",
        KEYS[0],
        "Bearer",
        f"Bearer {KEYS[0]}x",
        f"Bearer {KEYS[0][:-1]}",
        f"Bearer {KEYS[0]},{KEYS[1]}",
    ],
    ids=[
        "wrong key",
        "basic scheme",
        "no scheme",
        "scheme without a key",
        "key plus a character",
        "key less a character",
        "two keys",
    ],
)
def test_a_wrong_key_is_401(server, authorization):
    response = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": "clip", "input": "a"},
        headers={"Authorization": authorization},
        timeout=30,
    )
    assert_unauthorized(response)


@pytest.mark.parametrize("key", [*KEYS, FILE_KEY], ids=["first key", "second key", "key from the file"])
def test_each_key_opens_every_route(server, key):
    image = b64(png_bytes(random_image(51)))
    search = httpx.post(
        f"{server.url}/search", json={"image_data": image, "texts": ["a", "b"]}, headers=bearer(key), timeout=60
    )
    assert search.status_code == 200, search.text
    assert len(search.json()["similarities"]) == 2
    # The scheme's case does not matter (RFC 9110); the key's does.
    assert (
        httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {key}"}, timeout=30).status_code == 200
    )
    assert_unauthorized(httpx.get(f"{server.url}/v1/models", headers=bearer(key.upper()), timeout=30))


def test_probes_stay_open_and_metrics_follow_the_setting(server):
    for path in PROBES:
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path
    assert_unauthorized(httpx.get(f"{server.url}/metrics", timeout=30))  # MULTIMODAL_METRICS_OPEN=false
    metrics = httpx.get(f"{server.url}/metrics", headers=bearer(KEYS[1]), timeout=30)
    assert metrics.status_code == 200 and "clip_requests_total" in metrics.text


def test_the_openai_sdk_sends_its_api_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[1], max_retries=0)
    embeddings = client.embeddings.create(model="clip", input=["a photo of a cat"])
    assert len(embeddings.data) == 1 and len(embeddings.data[0].embedding) > 0
    assert [model.id for model in client.models.list()] == ["tiny-clip"]
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-not-ours", max_retries=0).embeddings.create(
            model="clip", input="a"
        )
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"


def test_the_openapi_document_states_the_scheme(server):
    document = httpx.get(f"{server.url}/openapi.json", headers=bearer(KEYS[0]), timeout=30).json()
    assert document["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    assert document["security"] == [{"apiKey": []}]
    assert "401" in document["paths"]["/v1/embeddings"]["post"]["responses"]
    assert document["paths"]["/health"]["get"]["security"] == []
