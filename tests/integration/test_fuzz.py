"""Schemathesis against the OpenAPI document that a real ``bentoml serve`` of the product serves.

Every operation in the document is fuzzed with schema-valid (positive) and schema-invalid
(negative) requests. A test fails on any 5xx, on a response slower than ``HANG_SECONDS``, on a
status the document does not list, and on a body, content type or header that does not match
it. Schemathesis cannot make lone surrogates, NaN audio or pixel bombs: test_bad_inputs.py has
those.

Left out, with the reason:
- ``positive_data_acceptance`` (schema-valid data must be accepted): no JSON schema can say "this
  string decodes as a PNG" or "this upload is audio", so schema-valid random data is rightly 400,
  404 or 415 on almost every route.
- chat with ``stream: true``: an event stream cannot be checked against a JSON schema, each
  streamed generation holds the CPU vLLM, and test_llava_api.py checks streaming against vLLM;
  generated chat requests are sent unstreamed (``_unstreamed``).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import b64, png_bytes, random_image, wav_bytes

pytestmark = pytest.mark.integration

# A request slower than this counts as a hang. Generous for a 2-core machine shared with other
# tests; a real hang (a lost batch, a dead engine) waits for the 60 s request timeout or forever.
HANG_SECONDS = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Generated examples per operation and mode; chat's are fewer because a valid one runs vLLM on the
# CPU. About 650 requests in all: under a minute here.
EXAMPLES = 40
EXAMPLES_BY_PATH = {"/v1/chat/completions": 15}
OPERATIONS = [
    ("POST", "/search"),
    ("POST", "/classify"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("POST", "/transcribe"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/v1/library"),
    ("GET", "/v1/library/{collection}"),
    ("POST", "/v1/library/{collection}/images"),
    ("GET", "/v1/library/{collection}/images"),
    ("DELETE", "/v1/library/{collection}/images/{item_id}"),
    ("POST", "/v1/library/{collection}/delete"),
    ("POST", "/v1/library/{collection}/lookup"),
    ("POST", "/v1/library/{collection}/search"),
]

# Valid and invalid requests for each operation; the GET and DELETE routes' only inputs are path and
# query parameters, whose invalid values test_bad_inputs.py sends.
FUZZ_RUNS = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode is GenerationMode.POSITIVE
]


@pytest.fixture(scope="module")
def api(hardened_product) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{hardened_product.url}/openapi.json", timeout=30)
    schema.config.update(base_url=hardened_product.url)
    return schema


def test_every_route_in_the_document_is_fuzzed(hardened_product):
    document = httpx.get(f"{hardened_product.url}/openapi.json", timeout=30).json()
    served = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert served == set(OPERATIONS)


def _report(case: Any, response: Any, failure: BaseException) -> str:
    failures = failure.exceptions if isinstance(failure, BaseExceptionGroup) else (failure,)
    found = "; ".join(f"{getattr(f, 'title', type(f).__name__)}: {getattr(f, 'message', f)}" for f in failures)
    return (
        f"{case.method} {case.path} -> {response.status_code}: {found}\n"
        f"request body: {case.body!r:.1500}\nresponse: {response.text:.1500}"
    )


def _unstreamed(case: Any) -> None:
    if case.path == "/v1/chat/completions" and isinstance(case.body, dict) and case.body.get("stream") is True:
        case.body["stream"] = False


# Random strings are never an image, audio or a served model's name, so on their own the fuzzer's
# cases stop at the first check (400, 404, 415). Half the valid-mode cases get real values in
# those fields, the rest of the case still generated, so that they reach the models.
IMAGE = b64(png_bytes(random_image(5, (24, 16))))
WAV = wav_bytes(np.random.default_rng(5).uniform(-0.1, 0.1, 16_000).astype(np.float32))
MODELS = {"/v1/embeddings": "tiny-clip", "/v1/chat/completions": "tiny-llava"}


def _realistic(case: Any) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    if "image_data" in body:
        body["image_data"] = IMAGE
    if case.path in MODELS:
        body["model"] = MODELS[case.path]
    if case.path.startswith("/v1/audio/"):
        body["model"] = "whisper-1"
    for field in ("file", "audio"):
        if field in body:
            body[field] = WAV
    images = body.get("images") if case.path.startswith("/v1/library/") else None
    for item in images if isinstance(images, list) else []:
        if isinstance(item, dict) and "image" in item:
            item["image"] = IMAGE
    for message in body.get("messages") or []:
        for part in message.get("content") if isinstance(message.get("content"), list) else []:
            if part.get("type") == "image_url":
                part["image_url"]["url"] = f"data:image/png;base64,{IMAGE}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method,path,mode", FUZZ_RUNS, ids=[f"{m} {p} {mode.value}" for m, p, mode in FUZZ_RUNS])
def test_fuzz(api, hardened_product, method: str, path: str, mode: GenerationMode) -> None:
    operation = api[path][method]
    slowest: list[float] = [0.0]

    # No shrinking: a failure is reported as generated, so a failing run stays bounded in time.
    @settings(
        max_examples=EXAMPLES_BY_PATH.get(path, EXAMPLES),
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,  # the same cases on every run: CI is repeatable, a failure reproducible
    )
    @given(case=operation.as_strategy(generation_mode=mode), realistic=st.booleans())
    def run(case: Any, realistic: bool) -> None:
        if realistic and mode is GenerationMode.POSITIVE:
            _realistic(case)
        _unstreamed(case)
        started = time.monotonic()
        response = case.call(base_url=hardened_product.url, timeout=HANG_SECONDS)
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, BaseExceptionGroup) as failure:
            # Schemathesis's own report repeats the whole body as a curl command: megabytes for an upload.
            raise AssertionError(_report(case, response, failure)) from None
        slowest[0] = max(slowest[0], time.monotonic() - started)

    run()
    assert slowest[0] < HANG_SECONDS
    # Still healthy after the operation's cases.
    assert httpx.get(f"{hardened_product.url}/health", timeout=10).status_code == 200
