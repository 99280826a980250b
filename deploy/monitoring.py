"""Prometheus Operator resources: what to scrape, the alerts, and the Grafana dashboard's ConfigMap."""

from __future__ import annotations

import json

from deploy import alerts, dashboard
from deploy.k8s import Manifest, metadata
from deploy.spec import PART_OF, DeploymentSpec


def service_monitor(spec: DeploymentSpec) -> Manifest:
    """Every product Service's ``/metrics`` (BentoML serves it on the API port); not Redis's."""
    selector = {
        "matchLabels": {"app.kubernetes.io/part-of": PART_OF},
        "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": ["entry", "model"]}],
    }
    endpoint = {"port": "http", "path": "/metrics", "interval": spec.monitoring.scrape_interval, "scrapeTimeout": "10s"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(PART_OF, spec, spec.monitoring.selector_labels),
        "spec": {"selector": selector, "endpoints": [endpoint]},
    }


def prometheus_rule(spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata(PART_OF, spec, spec.monitoring.selector_labels),
        "spec": {"groups": alerts.rule_groups(spec.settings)},
    }


def rule_file(spec: DeploymentSpec) -> Manifest:
    """The same rules as a plain Prometheus rule file (``rule_files:``, ``promtool``)."""
    return {"groups": alerts.rule_groups(spec.settings)}


def dashboard_configmap(spec: DeploymentSpec) -> Manifest:
    """Picked up by Grafana's dashboard sidecar (kube-prometheus-stack) in the monitoring namespace."""
    board = dashboard.dashboard(spec.settings, spec.namespace)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(
            f"{PART_OF}-dashboard", spec, {"grafana_dashboard": "1"}, namespace=spec.monitoring.namespace
        ),
        "data": {f"{PART_OF}.json": json.dumps(board, indent=2, sort_keys=False) + "\n"},
    }
