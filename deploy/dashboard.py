"""The Grafana dashboard: the original design's panels, then one row per model family.

Design panels: request rate by status and p95 latency; GPU utilisation gauge; cache hit rate
and hits per second; similarity-score distribution as a heatmap. Every query filters on the
``$namespace`` variable, so one dashboard serves every deployment of the product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from configuration.families import TITLES
from configuration.settings import Settings

Panel = dict[str, Any]
NS = 'namespace="$namespace"'
RATE = "$__rate_interval"


@dataclass
class _Layout:
    """Places panels left to right in rows 24 units wide."""

    x: int = 0
    y: int = 0
    row_height: int = 0
    next_id: int = 1
    panels: list[Panel] = field(default_factory=list)

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "title": title, "id": self._id(), "collapsed": False, "gridPos": self._pos(24, 1)}
        )
        self.y += 1

    def add(self, panel: Panel, width: int = 8, height: int = 8) -> None:
        if self.x + width > 24:
            self._newline()
        self.panels.append({**panel, "id": self._id(), "gridPos": self._pos(width, height)})
        self.x += width
        self.row_height = max(self.row_height, height)

    def _pos(self, width: int, height: int) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": width, "h": height}

    def _newline(self) -> None:
        self.y += self.row_height
        self.x, self.row_height = 0, 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _target(expr: str, legend: str = "", **extra: Any) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}, **extra}


def _panel(kind: str, title: str, targets: list[dict[str, Any]], unit: str = "short", **options: Any) -> Panel:
    for ref, target in zip("ABCDEFGH", targets, strict=False):
        target["refId"] = ref
    return {
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        **options,
    }


def _quantile(q: float, metric: str, by: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{NS}}}[{RATE}])))"


def traffic(layout: _Layout, families: list[str]) -> None:
    layout.row("Traffic")
    for family in families:
        expr = f"sum by (status) (rate({family}_requests_total{{{NS}}}[{RATE}]))"
        layout.add(
            _panel("timeseries", f"{TITLES[family]} requests/s by status", [_target(expr, "{{status}}")], "reqps")
        )
    p95 = [
        _target(_quantile(0.95, f"{family}_request_duration_seconds", "endpoint"), "{{endpoint}}")
        for family in families
    ]
    layout.add(_panel("timeseries", "p95 latency by route", p95, "s"), width=12)
    queue = _target(f"sum by (model) (queue_depth{{{NS}}})", "{{model}}")
    layout.add(_panel("timeseries", "Queue depth by model (the autoscaling signal)", [queue]), width=12)


def gpu(layout: _Layout) -> None:
    layout.row("GPU (CLIP and Whisper services)")
    gauge = {"options": {"reduceOptions": {"calcs": ["lastNotNull"]}}}
    for metric, title in (
        ("gpu_utilization_percent", "GPU utilisation"),
        ("gpu_memory_used_percent", "GPU memory"),
    ):
        target = _target(f"max by (pod, gpu) ({metric}{{{NS}}})", "{{pod}} GPU {{gpu}}")
        panel = _panel("gauge", title, [target], "percent", **gauge)
        panel["fieldConfig"]["defaults"] |= {"min": 0, "max": 100}
        layout.add(panel, width=12)


def clip(layout: _Layout) -> None:
    layout.row("CLIP")
    hits, misses = (
        f"sum(rate(clip_cache_hits_total{{{NS}}}[{RATE}]))",
        f"sum(rate(clip_cache_misses_total{{{NS}}}[{RATE}]))",
    )
    hit_rate = [
        _target(f"{hits} / ({hits} + {misses})", "over the interval"),
        _target(f"clip_cache_hit_rate{{{NS}}}", "{{pod}} since start"),
    ]
    layout.add(_panel("timeseries", "Cache hit rate", hit_rate, "percentunit"))
    per_second = [
        _target(f"sum by (kind) (rate(clip_cache_hits_total{{{NS}}}[{RATE}]))", "hits {{kind}}"),
        _target(f"sum by (kind) (rate(clip_cache_misses_total{{{NS}}}[{RATE}]))", "misses {{kind}}"),
        _target(f"sum by (backend) (rate(clip_cache_errors_total{{{NS}}}[{RATE}]))", "errors {{backend}}"),
    ]
    layout.add(_panel("timeseries", "Cache hits per second", per_second, "ops"))
    heatmap = _target(
        f"sum by (le) (increase(clip_similarity_scores_bucket{{{NS}}}[{RATE}]))", "{{le}}", format="heatmap"
    )
    layout.add(
        _panel(
            "heatmap",
            "Similarity-score distribution",
            [heatmap],
            options={"calculate": False, "yAxis": {"unit": "short"}},
        )
    )
    encoder = [
        _target(_quantile(0.99, "clip_embedding_duration_seconds", "kind"), "p99 {{kind}}"),
    ]
    layout.add(_panel("timeseries", "Encoder batch latency", encoder, "s"), width=12)
    batch = [_target(_quantile(0.5, "clip_batch_size", "kind"), "median {{kind}}")]
    layout.add(_panel("timeseries", "Items per encoder batch", batch), width=12)


def library(layout: _Layout) -> None:
    """The image library (served with CLIP): its size, search latency and add throughput."""
    layout.row("Image library")
    size = [_target(f"max by (collection) (library_index_size{{{NS}}})", "{{collection}}")]
    layout.add(_panel("timeseries", "Images per collection", size))
    search = [
        _target(_quantile(0.5, "library_search_duration_seconds", "by"), "p50 by {{by}}"),
        _target(_quantile(0.99, "library_search_duration_seconds", "by"), "p99 by {{by}}"),
    ]
    layout.add(_panel("timeseries", "Search latency (query embedding included)", search, "s"))
    adds = [
        _target(f"sum by (collection) (rate(library_items_added_total{{{NS}}}[{RATE}]))", "{{collection}}"),
        _target(f"sum(rate(library_search_duration_seconds_count{{{NS}}}[{RATE}]))", "searches/s"),
    ]
    layout.add(_panel("timeseries", "Images added/s and searches/s", adds, "ops"))


def llava(layout: _Layout) -> None:
    layout.row("LLaVA (vLLM)")
    kv = _target(f"max by (pod) (vllm:kv_cache_usage_perc{{{NS}}})", "{{pod}}")
    layout.add(_panel("timeseries", "KV-cache usage", [kv], "percentunit"), width=6)
    requests = [
        _target(f"sum(vllm:num_requests_running{{{NS}}})", "running"),
        _target(f"sum(vllm:num_requests_waiting{{{NS}}})", "waiting"),
    ]
    layout.add(_panel("timeseries", "Requests in the engine", requests), width=6)
    ttft = [_target(_quantile(0.95, "vllm:time_to_first_token_seconds"), "p95")]
    layout.add(_panel("timeseries", "Time to first token", ttft, "s"), width=6)
    tokens = [_target(f"sum(rate(vllm:generation_tokens_total{{{NS}}}[{RATE}]))", "generated")]
    layout.add(_panel("timeseries", "Generated tokens/s", tokens), width=6)


def whisper(layout: _Layout) -> None:
    layout.row("Whisper")
    audio = [_target(f"sum by (task) (rate(whisper_audio_seconds_total{{{NS}}}[{RATE}]))", "{{task}}")]
    layout.add(_panel("timeseries", "Audio seconds processed per second", audio))
    rtf = [
        _target(_quantile(0.5, "whisper_real_time_factor", "task"), "median {{task}}"),
        _target(_quantile(0.95, "whisper_real_time_factor", "task"), "p95 {{task}}"),
    ]
    layout.add(_panel("timeseries", "Real-time factor (processing time / audio time)", rtf))
    batches = [
        _target(_quantile(0.5, "whisper_batch_size", "kind"), "median windows {{kind}}"),
        _target(_quantile(0.95, "whisper_batch_duration_seconds", "kind"), "p95 seconds {{kind}}"),
    ]
    layout.add(_panel("timeseries", "Decode batches", batches))


def dashboard(settings: Settings, namespace: str) -> dict[str, Any]:
    families = list(settings.families)
    layout = _Layout()
    traffic(layout, families)
    if {"clip", "whisper"} & set(families):
        gpu(layout)
    for family, build in (("clip", clip), ("llava", llava), ("whisper", whisper)):
        if family in families:
            build(layout)
            if family == "clip":
                library(layout)
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
        {
            "name": "namespace",
            "label": "Namespace",
            "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": "label_values(queue_depth, namespace)", "refId": "namespace"},
            "current": {"text": namespace, "value": namespace},
            "refresh": 2,
        },
    ]
    return {
        "uid": "multimodal-serving",
        "title": "Multimodal serving",
        "tags": ["multimodal-serving", "bentoml"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "panels": layout.panels,
    }
