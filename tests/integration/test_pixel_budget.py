"""Pixel budgets against a real ``bentoml serve`` (CLIP only, default limits): decompression bombs and
requests over the per-request budget are 413 at the entry service, before anything is decoded.

What shows that nothing was decoded is the CLIP process's peak resident memory (``VmHWM``): one
40 MP image decoded to RGB is 120 MB, and the over-budget request below 375 MB, so a peak that
grows less than ``PEAK_GROWTH_BOUND`` over all of them proves none reached a decoder. The
embedding cache must come out of it untouched, and the server healthy.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.helpers import b64, data_url, jpeg_bytes, metric_value, palette_png, photograph

pytestmark = pytest.mark.integration
TIMEOUT = 120
# Well under one decoded bomb (6324 x 6324 x 3 bytes = 120 MB): what a few requests' JSON, base64
# and header parsing may add to a process's peak.
PEAK_GROWTH_BOUND = 64 * 2**20

BOMB = data_url(palette_png(6324, 6324))  # 39 KB declaring 40 MP, under the per-image cap
OVER_BUDGET = [data_url(palette_png(5000, 5000, 80, seed)) for seed in range(5)]  # 5 x 25 MP, ~150 pixels per byte each
PHOTO = data_url(jpeg_bytes(photograph("chelsea.png").convert("RGB")), "image/jpeg")


@pytest.fixture(scope="module")
def server(serve_product):
    return serve_product(MULTIMODAL_FAMILIES="clip")


def worker(server, service: str) -> psutil.Process:
    """The BentoML worker process serving ``service`` (``--service-name``) under this server."""
    for child in psutil.Process(server.process.popen.pid).children(recursive=True):
        args = child.cmdline()
        if "--service-name" in args and args[args.index("--service-name") + 1] == service:
            return child
    pytest.fail(f"no {service} worker under the server")


def peak_resident_bytes(process: psutil.Process) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def embed(server, inputs: list[str]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": "clip", "input": inputs, "encoding_format": "float"},
        timeout=TIMEOUT,
    )


def image_cache(server) -> tuple[float, float]:
    metrics = server.metrics()
    return metric_value(metrics, "clip_cache_hits_total", kind="image"), metric_value(
        metrics, "clip_cache_misses_total", kind="image"
    )


def test_bombs_and_over_budget_requests_are_413_and_never_decoded(server):
    stored = embed(server, [PHOTO, "a cat"])  # warms every path, and puts the photo in the cache
    assert stored.status_code == 200, stored.text
    stored_vector = np.array(stored.json()["data"][0]["embedding"])
    clip, gateway = worker(server, "CLIP"), worker(server, "Gateway")
    clip_peak, gateway_peak = peak_resident_bytes(clip), peak_resident_bytes(gateway)
    hits, misses = image_cache(server)

    bomb_requests = [
        ("/v1/embeddings", {"model": "clip", "input": ["a cat", BOMB]}, "input[1]"),
        ("/search", {"image_data": BOMB, "texts": ["a cat"]}, "image_data"),
        ("/classify", {"image_data": b64(palette_png(6324, 6324)), "labels": ["cat", "dog"]}, "image_data"),
    ]
    for _ in range(3):
        for route, body, param in bomb_requests:
            answer = httpx.post(f"{server.url}{route}", json=body, timeout=TIMEOUT)
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"]["code"] == "image_too_large" and answer.json()["error"]["param"] == param
            assert "decompression bomb" in answer.json()["error"]["message"]
        # The stored photo first: a request over the budget must not reach the cache either.
        over = embed(server, [PHOTO, *OVER_BUDGET])
        assert over.status_code == 413, over.text
        assert over.json()["error"] == {
            "message": over.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": "input",
            "code": "too_many_pixels",
        }
        assert "125.1 MP" in over.json()["error"]["message"]  # 5 x 25 MP and the 451x300 photo

    assert peak_resident_bytes(clip) - clip_peak < PEAK_GROWTH_BOUND, "the CLIP service decoded a refused image"
    assert peak_resident_bytes(gateway) - gateway_peak < PEAK_GROWTH_BOUND, "the entry service decoded a refused image"
    assert image_cache(server) == (hits, misses), "a refused request touched the cache"

    # What was stored is still there, unchanged: served from the cache, not encoded again.
    again = embed(server, [PHOTO])
    assert again.status_code == 200
    np.testing.assert_array_equal(np.array(again.json()["data"][0]["embedding"]), stored_vector)
    assert image_cache(server) == (hits + 1, misses)
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "healthy"
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
    metrics = server.metrics()
    assert metric_value(metrics, "clip_requests_total", status="500") == 0
    assert metric_value(metrics, "image_pixel_refusals_total", status="413") >= 3  # the over-budget requests


def test_a_request_within_the_budget_is_served_and_its_pixels_released(server):
    # 4 x 25 MP = 100 MP: exactly the per-request budget, so it is admitted, and served (the CLIP
    # service decodes it); twice in a row, which fails if the first left its pixels reserved
    # (2 x 100 MP would still fit in the 200 MP in flight, so a third shows the release).
    images = OVER_BUDGET[:4]
    for _ in range(3):
        answer = embed(server, images)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"]) == 4
    assert metric_value(server.metrics(), "image_pixels_in_flight") == 0
