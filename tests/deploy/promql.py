"""The metric names a PromQL expression reads, and every expression the manifests hold.

A small scanner, not a parser: it removes what cannot be a metric name (strings, label
matchers, ranges, grouping clauses, numbers, Grafana variables), then keeps the identifiers
that are not functions, aggregations or keywords. Its own tests pin it on our expressions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # $__rate_interval, ${datasource}
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = CLAUSE.sub(" ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        followed_by_call = re.match(r"\s*\(", text[match.end() :])
        if not followed_by_call and match.group().lower() not in KEYWORDS:
            names.add(match.group())
    return names


def dashboard_expressions(board: dict[str, Any]) -> Iterator[str]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict) and (found := re.match(r"label_values\((\w+)\s*,", query["query"])):
            yield found.group(1)


def manifest_expressions(documents: list[dict[str, Any]], adapter_values: dict[str, Any]) -> dict[str, set[str]]:
    """Metric names by where they are used: alerts, HPA, adapter, KEDA, dashboard."""
    used: dict[str, set[str]] = {"alerts": set(), "hpa": set(), "adapter": set(), "keda": set(), "dashboard": set()}
    for doc in documents:
        if doc["kind"] == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    used["alerts"] |= metric_names(rule["expr"])
        elif doc["kind"] == "HorizontalPodAutoscaler":
            for metric in doc["spec"]["metrics"]:
                source = metric.get("pods") or metric.get("external")
                if source:  # served by the adapter under the series' own name (name.as)
                    used["hpa"].add(source["metric"]["name"])
        elif doc["kind"] == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                if trigger["type"] == "prometheus":
                    used["keda"] |= metric_names(trigger["metadata"]["query"])
        elif doc["kind"] == "ConfigMap" and doc["metadata"].get("labels", {}).get("grafana_dashboard"):
            for text in doc["data"].values():
                for expr in dashboard_expressions(json.loads(text)):
                    used["dashboard"] |= metric_names(expr)
    for rule in [*adapter_values["rules"]["custom"], *adapter_values["rules"]["external"]]:
        used["adapter"] |= metric_names(rule["seriesQuery"])
    return used
