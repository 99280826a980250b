"""Prometheus metrics the alerts, the dashboard and the autoscaler are written against.

BentoML serves every process's metrics on ``/metrics`` through prometheus_client's
multiprocess collector, so gauges name how their per-process values combine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from configuration.families import FAMILIES, Family

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIMILARITY_BUCKETS = tuple(round(-1 + 0.1 * i, 1) for i in range(21))

# Requests, by model family and the public route they came to: clip_requests_total, ...
REQUESTS = {
    family: Counter(
        f"{family}_requests_total", f"{family} requests by endpoint and HTTP status", ["endpoint", "status"]
    )
    for family in FAMILIES
}
REQUEST_DURATION = {
    family: Histogram(
        f"{family}_request_duration_seconds", f"{family} request latency", ["endpoint"], buckets=LATENCY_BUCKETS
    )
    for family in FAMILIES
}

# The model service
EMBEDDING_DURATION = Histogram(
    "clip_embedding_duration_seconds", "Time to encode one batch", ["kind"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "clip_batch_size", "Items per encoder batch", ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)

# The GPU, sampled by every model service that runs its model on one (CLIP and Whisper; vLLM has its own).
# Labelled by GPU index, so a CPU-only host exports no GPU series at all rather than zeros.
GPU_UTILIZATION = Gauge("gpu_utilization_percent", "GPU utilisation", ["gpu"], multiprocess_mode="livemax")
GPU_MEMORY = Gauge("gpu_memory_used_percent", "GPU memory in use", ["gpu"], multiprocess_mode="livemax")
# The same values under the original design's names, which say CLIP although Whisper writes them too:
# still exported for dashboards and alerts written against them.
LEGACY_GPU_UTILIZATION = Gauge(
    "clip_gpu_utilization_percent",
    "GPU utilisation (old name of gpu_utilization_percent)",
    ["gpu"],
    multiprocess_mode="livemax",
)
LEGACY_GPU_MEMORY = Gauge(
    "clip_gpu_memory_utilization_percent",
    "GPU memory in use (old name of gpu_memory_used_percent)",
    ["gpu"],
    multiprocess_mode="livemax",
)

# Answers
SIMILARITY = Histogram("clip_similarity_scores", "Image-text cosine similarities served", buckets=SIMILARITY_BUCKETS)

# Embedding cache
CACHE_HITS = Counter("clip_cache_hits_total", "Embedding cache hits", ["kind"])
CACHE_MISSES = Counter("clip_cache_misses_total", "Embedding cache misses", ["kind"])
CACHE_HIT_RATE = Gauge("clip_cache_hit_rate", "Hit ratio since start", multiprocess_mode="livemostrecent")
CACHE_ERRORS = Counter("clip_cache_errors_total", "Cache backend failures (served as misses)", ["backend"])

# Whisper. Audio seconds and the real-time factor (processing time / audio duration, so
# below 1 is faster than real time) are counted by the entry service per request; batch
# sizes by the Whisper service per forward pass over 30-second windows.
WHISPER_AUDIO_SECONDS = Counter("whisper_audio_seconds_total", "Seconds of audio transcribed or translated", ["task"])
WHISPER_REAL_TIME_FACTOR = Histogram(
    "whisper_real_time_factor",
    "Processing time per second of audio, per request",
    ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WHISPER_BATCH_SIZE = Histogram(
    "whisper_batch_size",
    "30-second windows per batched forward pass",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
WHISPER_BATCH_DURATION = Histogram(
    "whisper_batch_duration_seconds", "Time to decode one batch of windows", ["kind"], buckets=LATENCY_BUCKETS
)
# Where a transcription's time goes, per request (entry service): reading and decoding the upload,
# detecting the language of a long recording (a model call its chunks' windows wait for, while
# their log-mels are made), and transcribing (from the chunks' start: the detection inside it).
WHISPER_STAGE_DURATION = Histogram(
    "whisper_stage_duration_seconds",
    "Time a transcription spends in each stage: decode_audio, detect_language, transcribe (its windows' "
    "turns in the queue included)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)

# Image library (services/library): per collection, as each entry-service worker last saw it.
LIBRARY_INDEX_SIZE = Gauge(
    "library_index_size", "Images in a library collection", ["collection"], multiprocess_mode="livemax"
)
LIBRARY_ITEMS_ADDED = Counter(
    "library_items_added_total", "Images added to (or replaced in) the library", ["collection"]
)
LIBRARY_SEARCH_DURATION = Histogram(
    "library_search_duration_seconds",
    "Library search latency, query embedding included, by what the query was",
    ["by"],
    buckets=LATENCY_BUCKETS,
)
LIBRARY_ADD_DURATION = Histogram(
    "library_add_duration_seconds", "Library add latency per request, embedding included", buckets=LATENCY_BUCKETS
)

# Autoscaling signal: model calls accepted by this pod and not yet answered
QUEUE_DEPTH = Gauge(
    "queue_depth", "Requests waiting for or inside a model batch", ["model"], multiprocess_mode="livesum"
)

# Decoded pixels admitted by the entry service and not yet answered (services/common/pixel_budget.py),
# summed over its workers; and the requests refused for pixels, by status (413 request, 429 busy).
PIXELS_IN_FLIGHT = Gauge(
    "image_pixels_in_flight", "Image pixels sent on to a model service, not yet answered", multiprocess_mode="livesum"
)
PIXEL_REFUSALS = Counter("image_pixel_refusals_total", "Requests refused by the pixel budgets", ["status"])

_cache_counts = {"hit": 0, "miss": 0}


def record_cache(kind: str, hits: int, misses: int) -> None:
    CACHE_HITS.labels(kind).inc(hits)
    CACHE_MISSES.labels(kind).inc(misses)
    _cache_counts["hit"] += hits
    _cache_counts["miss"] += misses
    total = _cache_counts["hit"] + _cache_counts["miss"]
    if total:
        CACHE_HIT_RATE.set(_cache_counts["hit"] / total)


@contextmanager
def queued(model: str) -> Iterator[None]:
    gauge = QUEUE_DEPTH.labels(model)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


# NVML's set-up (torch.cuda.utilization initialises it on every call) costs up to tens of
# milliseconds: sampled on every batch it was a fixed cost per batch on the serving path.
GPU_SAMPLE_SECONDS = 5.0
_last_gpu_sample = -GPU_SAMPLE_SECONDS


def record_gpu() -> None:
    """Sample the GPU this process uses, at most every GPU_SAMPLE_SECONDS; a no-op without one."""
    global _last_gpu_sample
    now = time.monotonic()
    if now - _last_gpu_sample < GPU_SAMPLE_SECONDS:
        return
    _last_gpu_sample = now
    import torch

    if not torch.cuda.is_available():
        return
    gpu = str(torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info()
    memory = 100.0 * (total - free) / total
    for gauge in (GPU_MEMORY, LEGACY_GPU_MEMORY):
        gauge.labels(gpu).set(memory)
    try:
        utilization = torch.cuda.utilization()
    except Exception:  # needs NVML, which some containers lack
        return
    for gauge in (GPU_UTILIZATION, LEGACY_GPU_UTILIZATION):
        gauge.labels(gpu).set(utilization)


class RequestMetricsMiddleware:
    """Counts and times requests to known routes, by family (other paths stay unlabelled)."""

    def __init__(self, app: ASGIApp, families: dict[str, Family]) -> None:
        self.app, self.families = app, families  # route -> model family

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        family = self.families.get(path)
        if scope["type"] != "http" or family is None:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except asyncio.CancelledError:
            # BentoML's timeout middleware cancels the request and answers 504 itself.
            status = 504 if status == 500 else status
            raise
        finally:
            REQUEST_DURATION[family].labels(path).observe(time.perf_counter() - start)
            REQUESTS[family].labels(path, str(status)).inc()
