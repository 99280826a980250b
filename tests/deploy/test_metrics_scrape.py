"""Every metric the alerts, the HPAs, the adapter, KEDA and the dashboard read is one the product exports.

The whole product runs (``bentoml serve``, every family), answers one request per family so
that the labelled series exist, and its ``/metrics`` is scraped as Prometheus would. Redis is
pointed at a closed port: each cache call then fails over to a miss, as the design wants,
which is also what makes the cache-error counter exist.
"""

from __future__ import annotations

import io
import wave

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.manifests import checked_in, rendered
from tests.deploy.promql import manifest_expressions, metric_names
from tests.helpers import b64, chat_body, data_url, png_bytes, random_image

# Sampled only where a GPU is (services.common.metrics.record_gpu returns early without CUDA, and the
# gauges are labelled by GPU index, so a CPU host exports no series of them at all).
GPU_ONLY = {"gpu_utilization_percent", "gpu_memory_used_percent"}


def test_metric_names_are_read_from_promql():
    expr = (
        'sum by (namespace) (rate(clip_requests_total{status=~"5.."}[5m]))'
        " / sum by (namespace) (rate(clip_requests_total[5m])) > 0.05"
    )
    assert metric_names(expr) == {"clip_requests_total"}
    assert metric_names("histogram_quantile(0.99, sum by (namespace, le) (rate(x_bucket[5m]))) > 1e3") == {"x_bucket"}
    assert metric_names('max by (pod) (vllm:kv_cache_usage_perc{namespace="$namespace"}) > 0.9') == {
        "vllm:kv_cache_usage_perc"
    }
    assert metric_names("a / on(pod) group_left(node) b offset 5m unless c") == {"a", "b", "c"}
    assert metric_names('sum(rate(hits{ns="$namespace"}[$__rate_interval])) + queue_depth') == {
        "hits",
        "queue_depth",
    }


def wav_bytes(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((tone * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scraped(serve_product) -> set[str]:
    # A generous request timeout: a loaded 2-core CI machine must not turn a slow answer into a 504.
    server = serve_product(MULTIMODAL_REDIS_URL="redis://127.0.0.1:9/0", MULTIMODAL_REQUEST_TIMEOUT_SECONDS="300")
    image = png_bytes(random_image(5))
    answers = [
        httpx.post(f"{server.url}/search", json={"image_data": b64(image), "texts": ["a cat", "a dog"]}, timeout=120),
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json=chat_body(data_url(image), "What is it?"),
            timeout=300,
        ),
        httpx.post(
            f"{server.url}/v1/audio/transcriptions",
            files={"file": ("tone.wav", wav_bytes(), "audio/wav")},
            data={"model": "whisper"},
            timeout=300,
        ),
    ]
    # The image library's labelled series (per collection, per kind of query) exist once used.
    library = f"{server.url}/v1/library/scraped"
    answers.append(httpx.post(f"{library}/images", json={"images": [{"image": b64(image)}]}, timeout=120))
    answers.append(httpx.post(f"{library}/search", json={"text": "a cat"}, timeout=120))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    text = server.metrics()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def used() -> dict[str, set[str]]:
    documents = rendered("base") + [d for d in rendered("overlays/keda") if d["kind"] == "ScaledObject"]
    return manifest_expressions(documents, checked_in("prometheus-adapter/values.yaml"))


def test_every_place_reads_some_metric(used: dict[str, set[str]]):
    assert all(used.values()), used


@pytest.mark.integration
def test_every_metric_read_is_exported(scraped: set[str], used: dict[str, set[str]]):
    missing = {place: sorted(names - scraped - GPU_ONLY) for place, names in used.items() if names - scraped - GPU_ONLY}
    assert not missing, f"read by the manifests, absent from /metrics: {missing}"


@pytest.mark.integration
def test_only_the_gpu_gauges_are_exempt(scraped: set[str], used: dict[str, set[str]]):
    everything = set().union(*used.values())
    assert everything >= GPU_ONLY, "the exemption names metrics no manifest reads"
    assert not GPU_ONLY & scraped, "a GPU gauge is exported here after all: drop its exemption"
