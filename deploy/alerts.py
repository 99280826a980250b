"""Alerting rules, written once and shipped twice: as a PrometheusRule (Prometheus Operator)
and as a plain Prometheus rule file, which ``promtool check rules`` and ``promtool test rules``
read (tests/deploy/alerts_test.yaml proves each alert fires when it should, and only then).

Thresholds are the original design's where it gave one, except the similarity alert's (see
``Thresholds``). Every expression aggregates by ``namespace``, so two deployments of the
product (staging, production) alert apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from configuration.families import TITLES
from configuration.settings import Settings
from deploy.spec import ENTRY_QUEUE_SHARE

Rule = dict[str, Any]


@dataclass(frozen=True)
class Thresholds:
    clip_p99_seconds: float = 0.5  # design: CLIP p99 latency > 0.5 s for 2 min
    embedding_p99_seconds: float = 1.0  # design: p99 embedding latency > 1 s
    # The design said: average similarity < 0.7 for 10 min. CLIP's image-text cosines sit far
    # below 1 (about 0.2-0.35 for matching pairs with ViT-L/14, lower for the other texts of a
    # request, all of them observed), so a fixed 0.7 fired on healthy traffic, and any fixed
    # floor depends on the model and on what clients send. The alert compares the namespace's
    # 10-minute average with its own average over a long window instead (deploy/README.md, "Alerts").
    # Fire below this share of the baseline: a 30% fall is far beyond the 10-minute average's noise
    # at the minimum rate below, and beyond the day's swings of traffic mix seen as normal.
    similarity_drop_ratio: float = 0.7
    # The baseline: every similarity observed in the namespace over this window (not offset: the
    # current 10 minutes are 0.7% of a day, so a sudden fall still shows; a day spans the daily
    # cycle of traffic mix). A lasting change becomes the new normal within the day (a fall from
    # 0.28 to 0.12 stops firing after about 16 hours), so a deliberate change of model or of
    # clients needs no re-tuning.
    similarity_baseline_window: str = "1d"
    # Observations per second over the 10 minutes below which the alert stays quiet: 300 in 10
    # minutes put the average within about +-0.01 (a single similarity spreads about +-0.1), while
    # a handful of one client's unrelated texts can halve it.
    similarity_min_rate: float = 0.5
    gpu_memory_percent: float = 90  # design: > 90% for 5 min, critical
    cache_hit_rate_floor: float = 0.6  # design: < 0.6 for 15 min, info
    error_ratio: float = 0.05  # 5xx answers
    # Of MULTIMODAL_MAX_CONCURRENT_REQUESTS, past which 429s come; the entry service's per-family
    # autoscaling targets add up to no more than this share (deploy/spec.py).
    queue_share_of_limit: float = ENTRY_QUEUE_SHARE
    kv_cache_usage: float = 0.9  # vLLM preempts and queues requests when its KV cache is full


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> Rule:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


def _p99(metric: str) -> str:
    return f"histogram_quantile(0.99, sum by (namespace, le) (rate({metric}_bucket[5m])))"


def _similarity_rate(window: str) -> str:
    return f"sum by (namespace) (rate(clip_similarity_scores_count[{window}]))"


def _average_similarity(window: str) -> str:
    return f"(sum by (namespace) (rate(clip_similarity_scores_sum[{window}])) / {_similarity_rate(window)})"


def clip_rules(t: Thresholds) -> list[Rule]:
    baseline = t.similarity_baseline_window
    hits, misses = (
        "sum by (namespace) (rate(clip_cache_hits_total[15m]))",
        "sum by (namespace) (rate(clip_cache_misses_total[15m]))",
    )
    return [
        _alert(
            "ClipRequestLatencyHigh",
            f"{_p99('clip_request_duration_seconds')} > {t.clip_p99_seconds}",
            "2m",
            "warning",
            f"CLIP p99 request latency is above {t.clip_p99_seconds} s",
            "p99 latency of CLIP routes in {{ $labels.namespace }} is {{ $value | humanizeDuration }}.",
        ),
        _alert(
            "ClipEmbeddingLatencyHigh",
            f"{_p99('clip_embedding_duration_seconds')} > {t.embedding_p99_seconds}",
            "5m",
            "warning",
            f"CLIP p99 encoder batch latency is above {t.embedding_p99_seconds} s",
            "p99 time to encode one batch in {{ $labels.namespace }} is {{ $value | humanizeDuration }}: "
            "the GPU is saturated or batches are too large (MULTIMODAL_CLIP_MAX_BATCH_SIZE).",
        ),
        _alert(
            "ClipSimilarityLow",
            # The 10-minute average, when below a share of the namespace's own long-run average and
            # computed over enough observations; its value is the 10-minute average.
            f"{_average_similarity('10m')} < {t.similarity_drop_ratio:g} * {_average_similarity(baseline)}"
            f" and {_similarity_rate('10m')} > {t.similarity_min_rate:g}",
            "10m",
            "warning",
            "Average image-text similarity served by CLIP fell well below its usual level",
            'Average similarity in {{ $labels.namespace }} is {{ $value | printf "%.2f" }} over 10 minutes, '
            f"below {t.similarity_drop_ratio:.0%} of its average over {baseline}: a change of CLIP model or "
            "preprocessing (MULTIMODAL_CLIP_MODEL, MULTIMODAL_CLIP_PREPROCESSING), or clients sending "
            "unrelated texts (deploy/README.md, Alerts).",
        ),
        _alert(
            "ClipCacheHitRateLow",
            # From the counters over the window, not clip_cache_hit_rate (a ratio since each pod started).
            f"{hits} / ({hits} + {misses}) < {t.cache_hit_rate_floor}",
            "15m",
            "info",
            f"Embedding cache hit rate is below {t.cache_hit_rate_floor}",
            "Cache hit rate in {{ $labels.namespace }} is {{ $value | humanizePercentage }} over 15 minutes.",
        ),
    ]


def gpu_rules(t: Thresholds) -> list[Rule]:
    return [
        _alert(
            "GpuMemoryHigh",
            # Sampled by the CLIP and Whisper services after each batch (vLLM reserves its share up front).
            f"max by (namespace, pod, gpu) (gpu_memory_used_percent) > {t.gpu_memory_percent}",
            "5m",
            "critical",
            f"GPU memory above {t.gpu_memory_percent:g}%",
            "GPU {{ $labels.gpu }} of {{ $labels.pod }} is {{ $value | humanize }}% full: "
            "out-of-memory errors are next.",
        )
    ]


def error_rules(families: list[str], t: Thresholds) -> list[Rule]:
    rules = []
    for family in families:
        total = f"sum by (namespace) (rate({family}_requests_total[5m]))"
        failed = f'sum by (namespace) (rate({family}_requests_total{{status=~"5.."}}[5m]))'
        title = TITLES[family]
        rules.append(
            _alert(
                f"{family.capitalize()}ErrorRateHigh",
                f"{failed} / {total} > {t.error_ratio}",
                "5m",
                "critical",
                f"More than {t.error_ratio:.0%} of {title} requests fail with 5xx",
                "{{ $value | humanizePercentage }} of " + title + " requests in {{ $labels.namespace }} fail.",
            )
        )
    return rules


def queue_rules(settings: Settings, t: Thresholds) -> list[Rule]:
    limit = math.ceil(t.queue_share_of_limit * settings.max_concurrent_requests)
    return [
        _alert(
            "QueueDepthHigh",
            f"sum by (namespace, pod) (queue_depth) > {limit}",
            "5m",
            "warning",
            "An entry pod's queue is close to its concurrency limit",
            "{{ $labels.pod }} holds {{ $value }} model calls; at "
            f"{settings.max_concurrent_requests} it answers 429. Autoscaling is not keeping up "
            "(at maxReplicas, or GPU nodes unavailable).",
        )
    ]


def llava_rules(t: Thresholds) -> list[Rule]:
    return [
        _alert(
            "LlavaKvCacheUsageHigh",
            f"max by (namespace, pod) (vllm:kv_cache_usage_perc) > {t.kv_cache_usage}",
            "10m",
            "warning",
            f"vLLM's KV cache is more than {t.kv_cache_usage:.0%} full",
            "KV cache of {{ $labels.pod }} is {{ $value | humanizePercentage }} full: "
            "requests queue and get preempted.",
        )
    ]


def rule_groups(settings: Settings, thresholds: Thresholds | None = None) -> list[Rule]:
    t = thresholds or Thresholds()
    families = list(settings.families)
    rules = error_rules(families, t) + queue_rules(settings, t)
    if "clip" in families:
        rules += clip_rules(t)
    if {"clip", "whisper"} & set(families):
        rules += gpu_rules(t)
    if "llava" in families:
        rules += llava_rules(t)
    return [{"name": "multimodal-serving", "rules": rules}]
