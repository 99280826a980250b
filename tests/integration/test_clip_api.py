"""The CLIP routes against a real ``bentoml serve`` (entry service + CLIP service processes)."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import (
    PHOTOGRAPHS,
    ReferenceClip,
    b64,
    data_url,
    jpeg_bytes,
    metric_samples,
    metric_value,
    photograph,
    png_bytes,
    png_header_only,
    random_image,
)

pytestmark = pytest.mark.integration
TOLERANCE = 1e-4


CLIP_ONLY = {"MULTIMODAL_FAMILIES": "clip"}


@pytest.fixture(scope="module")
def server(serve_product):
    return serve_product(**CLIP_ONLY)


@pytest.fixture(scope="module")
def uncached_server(serve_product):
    """No embedding cache, so repeated inputs really reach the model again."""
    return serve_product(MULTIMODAL_CACHE_BACKEND="none", **CLIP_ONLY)


@pytest.fixture(scope="module")
def reference_path_server(serve_product):
    """The reference preprocessing: Pillow decodes and transformers' processor runs on the CPU."""
    return serve_product(MULTIMODAL_CLIP_PREPROCESSING="reference", MULTIMODAL_CACHE_BACKEND="none", **CLIP_ONLY)


@pytest.fixture(scope="module")
def reference() -> ReferenceClip:
    return ReferenceClip()


def unique_texts(n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"photo {run} number {i} of a {'cat' if i % 2 else 'dog'}" for i in range(n)]


def post(server, route: str, payload: dict) -> httpx.Response:
    # json.dumps escapes non-ASCII (as many clients do), so lone surrogates travel as "\\ud800".
    body = json.dumps(payload).encode()
    return httpx.post(f"{server.url}{route}", content=body, headers={"content-type": "application/json"}, timeout=60)


# Parity with transformers on the same weights


@pytest.mark.parametrize("seed,size", [(1, (64, 48)), (2, (31, 200)), (3, (640, 480))])
def test_search_similarities_equal_transformers(server, reference, seed, size):
    image = random_image(seed, size)
    texts = ["a photo of a cat", "a diagram", "Ünïcödé text, with punctuation!", "x"]
    response = post(server, "/search", {"image_data": b64(png_bytes(image)), "texts": texts, "return_embeddings": True})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.similarities(image, texts)
    np.testing.assert_allclose(body["similarities"], expected, atol=TOLERANCE)
    assert body["best_match"] == texts[int(np.argmax(expected))]
    assert body["best_similarity"] == pytest.approx(float(expected.max()), abs=TOLERANCE)
    np.testing.assert_allclose(body["embeddings"]["image_embedding"], reference.image_embedding(image), atol=TOLERANCE)
    np.testing.assert_allclose(body["embeddings"]["text_embeddings"], reference.text_embeddings(texts), atol=TOLERANCE)


def test_search_omits_embeddings_unless_asked(server):
    response = post(server, "/search", {"image_data": b64(png_bytes(random_image(4))), "texts": ["a"]})
    assert response.status_code == 200
    assert "embeddings" not in response.json()


def test_classify_probabilities_equal_transformers_softmax(server, reference):
    image = random_image(5)
    labels = ["cat", "dog", "car", "tree"]
    response = post(server, "/classify", {"image_data": data_url(png_bytes(image)), "labels": labels})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.probabilities(image, [f"a photo of a {label}" for label in labels])
    got = {p["label"]: p["probability"] for p in body["predictions"]}
    np.testing.assert_allclose([got[label] for label in labels], expected, atol=TOLERANCE)
    assert body["best_label"] == labels[int(np.argmax(expected))]
    assert [p["probability"] for p in body["predictions"]] == sorted(got.values(), reverse=True)


def test_openai_sdk_text_embeddings(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    texts = unique_texts(3)
    result = client.embeddings.create(model=reference.model_name, input=texts)  # the SDK asks for base64
    assert [d.index for d in result.data] == [0, 1, 2]
    np.testing.assert_allclose([d.embedding for d in result.data], reference.text_embeddings(texts), atol=TOLERANCE)
    assert result.model == reference.model_name
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0

    floats = client.embeddings.create(model=reference.model_name, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, result.data[0].embedding, atol=1e-6)


def test_openai_sdk_image_and_text_embeddings_in_one_request(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    image = random_image(6)
    result = client.embeddings.create(model="clip", input=["a cat", data_url(png_bytes(image))])
    np.testing.assert_allclose(result.data[0].embedding, reference.text_embeddings(["a cat"])[0], atol=TOLERANCE)
    np.testing.assert_allclose(result.data[1].embedding, reference.image_embedding(image), atol=TOLERANCE)


def test_usage_counts_tokens_as_the_tokenizer_does_cached_or_not(server, reference):
    texts = unique_texts(3) + ["word " * 200]  # the last is truncated to the context length
    expected = sum(reference.token_counts(texts))
    for _ in range(2):  # the second answer comes from the cache
        usage = post(server, "/v1/embeddings", {"model": "clip", "input": texts}).json()["usage"]
        assert usage == {"prompt_tokens": expected, "total_tokens": expected}


def test_text_that_starts_with_data_is_text(server, reference):
    texts = ["data: 42 is the answer", "data:text/plain,hello"]
    response = post(server, "/v1/embeddings", {"model": "clip", "input": texts})
    assert response.status_code == 200, response.text
    got = [d["embedding"] for d in response.json()["data"]]
    np.testing.assert_allclose(got, reference.text_embeddings(texts), atol=TOLERANCE)


def test_openai_sdk_unknown_model_is_not_found(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="text-embedding-3-large", input="hi")
    assert raised.value.body["code"] == "model_not_found"


# Photographs, through both preprocessing paths

PHOTO_SIZES = [(320, 240), (640, 480), (1920, 1080), (480, 640)]


def photo_inputs() -> dict[str, bytes]:
    """Each photograph as a JPEG at one of several sizes, plus the JPEG variants decoders treat apart."""
    inputs = {
        f"{name}@{PHOTO_SIZES[i % 4]}": jpeg_bytes(photograph(name), PHOTO_SIZES[i % 4])
        for i, name in enumerate(PHOTOGRAPHS)
    }
    chelsea = photograph("chelsea.png")
    inputs["progressive"] = jpeg_bytes(chelsea, progressive=True)
    inputs["4:4:4 chroma"] = jpeg_bytes(chelsea, subsampling=0)
    inputs["CMYK"] = jpeg_bytes(chelsea.convert("CMYK"))
    inputs["PNG"] = png_bytes(chelsea)
    return inputs


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_photograph_embeddings_equal_transformers(request, reference, path):
    # On a CPU both paths decode JPEGs with libjpeg-turbo (torchvision's or Pillow's, which give the
    # same pixels) and run the same processor: the fast path is held to the reference's tolerance.
    # On a GPU nvJPEG and CUDA resizing differ slightly; bench/clip_gpu.py measures by how much.
    server = request.getfixturevalue("uncached_server" if path == "fast" else "reference_path_server")
    inputs = photo_inputs()
    response = post(
        server, "/v1/embeddings", {"model": "clip", "input": [data_url(data, "image/jpeg") for data in inputs.values()]}
    )
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]])
    expected = np.stack([reference.encoded_image_embedding(data) for data in inputs.values()])
    for name, row, want in zip(inputs, got, expected, strict=True):
        np.testing.assert_allclose(row, want, atol=TOLERANCE, err_msg=name)
    assert (got * expected).sum(axis=1).min() >= 0.9999  # cosine: both sides are unit vectors


def test_an_undecodable_image_fails_only_its_own_request(uncached_server, reference):
    photos = [jpeg_bytes(photograph("coffee.png"), size) for size in PHOTO_SIZES] * 2
    truncated = jpeg_bytes(photograph("rocket.jpg"))[:5_000]  # header intact, pixels cut off
    payloads = [[data_url(truncated, "image/jpeg")]] + [["a cat", data_url(photo, "image/jpeg")] for photo in photos]

    def embed(inputs: list[str]) -> httpx.Response:
        return post(uncached_server, "/v1/embeddings", {"model": "clip", "input": inputs})

    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        responses = list(pool.map(embed, payloads))
    assert responses[0].status_code == 400
    assert responses[0].json()["error"] | {"message": None} == {
        "message": None,
        "type": "invalid_request_error",
        "param": "input[0]",
        "code": "invalid_image",
    }
    for response, photo in zip(responses[1:], photos, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            response.json()["data"][1]["embedding"], reference.encoded_image_embedding(photo), atol=TOLERANCE
        )


# Adaptive batching


def test_concurrent_requests_are_batched_without_changing_results(uncached_server):
    server = uncached_server
    texts = unique_texts(32)
    images = [b64(png_bytes(random_image(100 + i))) for i in range(32)]
    before = server.metrics()

    def text_embedding(text: str) -> list[float]:
        response = post(server, "/v1/embeddings", {"model": "clip", "input": text})
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["embedding"]

    def image_embedding(image: str) -> list[float]:
        response = post(server, "/search", {"image_data": image, "texts": ["x"], "return_embeddings": True})
        assert response.status_code == 200, response.text
        return response.json()["embeddings"]["image_embedding"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent_texts = list(pool.map(text_embedding, texts))
        concurrent_images = list(pool.map(image_embedding, images))
    after = server.metrics()
    sequential_texts = [text_embedding(text) for text in texts]
    sequential_images = [image_embedding(image) for image in images]

    np.testing.assert_allclose(concurrent_texts, sequential_texts, atol=1e-5)
    np.testing.assert_allclose(concurrent_images, sequential_images, atol=1e-5)
    for kind in ("text", "image"):
        batches = metric_value(after, "clip_batch_size_count", kind=kind) - metric_value(
            before, "clip_batch_size_count", kind=kind
        )
        singles = metric_value(after, "clip_batch_size_bucket", kind=kind, le="1.0") - metric_value(
            before, "clip_batch_size_bucket", kind=kind, le="1.0"
        )
        assert batches - singles > 0, f"no {kind} batch larger than 1 among {batches} batches"

    # Fewer calls reached the CLIP service than requests brought texts (each /search brings its
    # "x" too): the entry service merges concurrent requests' items into one call while calls are
    # out. (The CLIP service's batcher then merges calls; with one entry-service worker whether two
    # calls meet depends on timing, so that is not asserted.)
    def text_calls(metrics_text: str) -> float:
        return sum(
            metric_samples(metrics_text, "bentoml_service_request_total", endpoint="/encode_texts", service_name="CLIP")
        )

    assert 0 < text_calls(after) - text_calls(before) < len(texts) + len(images)


# Embedding cache


def test_repeated_request_is_served_from_the_in_process_cache(server):
    texts = unique_texts(2)
    first = post(server, "/v1/embeddings", {"model": "clip", "input": texts})
    before = server.metrics()
    second = post(server, "/v1/embeddings", {"model": "clip", "input": texts})
    after = server.metrics()
    assert first.status_code == second.status_code == 200
    assert second.json()["data"] == first.json()["data"]
    assert (
        metric_value(after, "clip_cache_hits_total", kind="text")
        - metric_value(before, "clip_cache_hits_total", kind="text")
        == 2
    )
    assert metric_value(after, "clip_batch_size_count", kind="text") == metric_value(
        before, "clip_batch_size_count", kind="text"
    )


def test_redis_cache_hits_and_survives_redis_dying(serve_product, redis_server, reference):
    server = serve_product(MULTIMODAL_REDIS_URL=redis_server.url, MULTIMODAL_REDIS_RETRY_AFTER_SECONDS="0", **CLIP_ONLY)
    image = png_bytes(random_image(7))
    payload = {"image_data": b64(image), "texts": unique_texts(3)}

    first = post(server, "/search", payload)
    assert first.status_code == 200, first.text
    stored = redis_server.client().keys("emb:*")
    assert len(stored) == 4  # one image, three texts
    assert all(redis_server.client().ttl(key) > 0 for key in stored)

    before = server.metrics()
    second = post(server, "/search", payload)
    after = server.metrics()
    assert second.json()["similarities"] == first.json()["similarities"]
    assert metric_value(after, "clip_cache_hits_total") - metric_value(before, "clip_cache_hits_total") == 4

    redis_server.process.kill()  # the server must carry on without its cache
    results = [post(server, "/search", payload) for _ in range(3)]
    results += [
        post(server, "/search", {"image_data": b64(png_bytes(random_image(8 + i))), "texts": ["new text"]})
        for i in range(3)
    ]
    assert [r.status_code for r in results] == [200] * 6
    np.testing.assert_allclose(results[0].json()["similarities"], first.json()["similarities"], atol=TOLERANCE)
    np.testing.assert_allclose(
        results[3].json()["similarities"], reference.similarities(random_image(8), ["new text"]), atol=TOLERANCE
    )
    assert metric_value(server.metrics(), "clip_cache_errors_total", backend="redis") > 0


# Bad input: a 4xx in the one error shape, never a 500, and the server carries on


PNG = png_bytes(random_image(9))
BAD_REQUESTS = {
    "invalid base64": ("/search", {"image_data": "not*base64!", "texts": ["a"]}, 400),
    "non-image bytes": ("/search", {"image_data": b64(b"hello, I am not an image" * 10), "texts": ["a"]}, 400),
    "truncated png": ("/search", {"image_data": b64(PNG[: len(PNG) // 2]), "texts": ["a"]}, 400),
    "empty image": ("/search", {"image_data": "", "texts": ["a"]}, 400),
    "empty texts": ("/search", {"image_data": b64(PNG), "texts": []}, 400),
    "empty text": ("/search", {"image_data": b64(PNG), "texts": ["a", " "]}, 400),
    "10000 texts": ("/search", {"image_data": b64(PNG), "texts": ["a"] * 10_000}, 400),
    "20000x20000 header": ("/search", {"image_data": b64(png_header_only(20_000, 20_000)), "texts": ["a"]}, 413),
    "9000x9000 header": ("/classify", {"image_data": b64(png_header_only(9_000, 9_000)), "labels": ["a"]}, 413),
    "missing field": ("/search", {"texts": ["a"]}, 400),
    "wrong type": ("/search", {"image_data": 5, "texts": "a"}, 400),
    "unknown field": ("/search", {"image_data": b64(PNG), "texts": ["a"], "extra": 1}, 400),
    "non-base64 data url": ("/classify", {"image_data": "data:image/png,abc", "labels": ["a"]}, 400),
    "template without slot": ("/classify", {"image_data": b64(PNG), "labels": ["a"], "template": "a photo"}, 400),
    "embeddings empty list": ("/v1/embeddings", {"model": "clip", "input": []}, 400),
    "embeddings 10000 inputs": ("/v1/embeddings", {"model": "clip", "input": ["a"] * 10_000}, 400),
    "embeddings bad image": ("/v1/embeddings", {"model": "clip", "input": ["data:image/png;base64,AAAA"]}, 400),
    "embeddings token arrays": ("/v1/embeddings", {"model": "clip", "input": [[1, 2, 3]]}, 400),
    "embeddings wrong dimensions": ("/v1/embeddings", {"model": "clip", "input": "a", "dimensions": 7}, 400),
    "embeddings lone surrogate": ("/v1/embeddings", {"model": "clip", "input": ["fine", "bad \ud800"]}, 400),
    "search lone surrogate": ("/search", {"image_data": b64(PNG), "texts": ["\udfff"]}, 400),
    "classify lone surrogate label": ("/classify", {"image_data": b64(PNG), "labels": ["cat\ud83d"]}, 400),
    "classify lone surrogate template": (
        "/classify",
        {"image_data": b64(PNG), "labels": ["cat"], "template": "\ud800 {}"},
        400,
    ),
    "embeddings image data url not base64": ("/v1/embeddings", {"model": "clip", "input": ["data:image/png,abc"]}, 400),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_in_the_error_shape(server, name):
    route, payload, status = BAD_REQUESTS[name]
    response = post(server, route, payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]


def test_the_openapi_document_lists_the_errors_the_api_sends(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    routes = [
        "/search",
        "/classify",
        "/v1/embeddings",
        "/v1/chat/completions",
        "/v1/audio/transcriptions",
        "/transcribe",
    ]
    for route in routes:
        responses = schema["paths"][route]["post"]["responses"]
        assert {"400", "404", "413", "429", "503"} <= set(responses), route
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert "415" in schema["paths"]["/transcribe"]["post"]["responses"]
    assert all("422" not in operation["responses"] for path in schema["paths"].values() for operation in path.values())
    assert schema["components"]["schemas"]["SearchRequest"]["properties"]["image_data"]["minLength"] == 1
    assert "text/event-stream" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


def test_a_wrong_method_is_405_with_allow(server):
    response = httpx.get(f"{server.url}/v1/embeddings")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_malformed_json_and_oversized_body(server):
    response = httpx.post(f"{server.url}/search", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(
        f"{server.url}/search", content=b"x" * (33 * 2**20), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_server_still_answers_after_bad_input(server, reference):
    for route, payload, _ in BAD_REQUESTS.values():
        post(server, route, payload)
    image = random_image(10)
    response = post(server, "/search", {"image_data": b64(png_bytes(image)), "texts": ["a", "b"]})
    assert response.status_code == 200
    np.testing.assert_allclose(
        response.json()["similarities"], reference.similarities(image, ["a", "b"]), atol=TOLERANCE
    )
    assert metric_value(server.metrics(), "clip_requests_total", status="500") == 0


# Health, readiness and metrics


def test_health_and_readiness_routes(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "healthy", "device": "cpu"}
    assert httpx.get(f"{server.url}/ready", timeout=10).json() == {"status": "ready", "families": {"clip": True}}
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-clip"]


def test_metrics_export_the_names_alerts_are_written_against(server):
    post(server, "/search", {"image_data": b64(png_bytes(random_image(11))), "texts": unique_texts(1)})
    text = server.metrics()
    assert metric_value(text, "clip_requests_total", endpoint="/search", status="200") >= 1
    assert metric_value(text, "clip_request_duration_seconds_count", endpoint="/search") >= 1
    assert metric_value(text, "clip_embedding_duration_seconds_count", kind="image") >= 1
    assert metric_value(text, "clip_similarity_scores_count") >= 1
    assert metric_value(text, "clip_cache_misses_total") >= 1
    assert metric_samples(text, "clip_cache_hit_rate")
    assert metric_samples(text, "queue_depth", model="clip") == [0.0]  # nothing waiting once answered
    assert not metric_samples(text, "clip_gpu_memory_utilization_percent")  # no GPU here, so no series


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (5, 3), (1, 300)])
def test_degenerate_image_shapes_equal_transformers(server, reference, size):
    # Images 1 or 3 pixels wide or high look like channel axes; they must still be read right.
    image = random_image(40, size)
    response = post(server, "/search", {"image_data": b64(png_bytes(image)), "texts": ["a"], "return_embeddings": True})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        response.json()["embeddings"]["image_embedding"], reference.image_embedding(image), atol=TOLERANCE
    )
