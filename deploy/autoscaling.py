"""Autoscaling on CPU and on the per-pod queue depth: HPA with prometheus-adapter, or KEDA.

How the queue metric flows. The entry service counts, per model, the calls it has accepted
and not yet had answered (``queue_depth{model}``, a gauge summed over its worker processes).
Prometheus scrapes it from every entry pod (ServiceMonitor), adding ``namespace``, ``pod`` and
``service`` labels. prometheus-adapter then serves it twice:

- as a custom metric of each pod (``custom.metrics.k8s.io``, ``pods/queue_depth``): the entry
  service's HPA averages it over its own pods;
- as an external metric (``external.metrics.k8s.io``, ``queue_depth``, selected by ``model``):
  a model service's HPA takes the namespace's total for its model with an ``AverageValue``
  target, which Kubernetes divides by that model's replica count. The model pods themselves
  hold no queue: requests wait in the entry service's calls, so that is where they are counted.

KEDA's ScaledObject does the same with its Prometheus trigger (AverageValue divides by the
replicas too) and creates the HPA itself; the KEDA component deletes ours.
"""

from __future__ import annotations

from deploy.k8s import Manifest, metadata
from deploy.spec import DeploymentSpec, ServiceSpec

QUEUE_METRIC = "queue_depth"

# The original design: up by at most 50% a minute after a 60 s window, down by at most 10% a
# minute after 300 s (slow: a GPU replica takes minutes to come back).
BEHAVIOR: Manifest = {
    "scaleUp": {
        "stabilizationWindowSeconds": 60,
        "selectPolicy": "Max",
        "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 300,
        "selectPolicy": "Max",
        "policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}],
    },
}


def _cpu(service: ServiceSpec) -> Manifest:
    target = {"type": "Utilization", "averageUtilization": service.autoscaling.cpu_utilization}
    return {"type": "Resource", "resource": {"name": "cpu", "target": target}}


def _queue(service: ServiceSpec) -> Manifest:
    target = {"type": "AverageValue", "averageValue": str(service.autoscaling.queue_depth_per_pod)}
    if service.is_entry:
        return {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC}, "target": target}}
    metric = {"name": QUEUE_METRIC, "selector": {"matchLabels": {"model": service.family}}}
    return {"type": "External", "external": {"metric": metric, "target": target}}


def hpa(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(service.name, spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service.name},
            "minReplicas": service.autoscaling.min_replicas,
            "maxReplicas": service.autoscaling.max_replicas,
            "metrics": [_cpu(service), _queue(service)],
            "behavior": BEHAVIOR,
        },
    }


def queue_query(service: ServiceSpec, spec: DeploymentSpec) -> str:
    """The namespace's queue for one service, in PromQL: what KEDA divides by the replica count."""
    if service.is_entry:
        return f'sum({QUEUE_METRIC}{{namespace="{spec.namespace}",service="{service.name}"}})'
    return f'sum({QUEUE_METRIC}{{namespace="{spec.namespace}",model="{service.family}"}})'


def scaled_object(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    scaling = service.autoscaling
    prometheus = {
        "serverAddress": spec.monitoring.prometheus_url,
        "query": queue_query(service, spec),
        "threshold": str(scaling.queue_depth_per_pod),
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(service.name, spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service.name},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": 15,
            "advanced": {"horizontalPodAutoscalerConfig": {"name": service.name, "behavior": BEHAVIOR}},
            "triggers": [
                {"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(scaling.cpu_utilization)}},
                {"type": "prometheus", "metricType": "AverageValue", "metadata": prometheus},
            ],
        },
    }


def adapter_rules() -> dict[str, list[Manifest]]:
    """prometheus-adapter's rules (its config file's `rules` and `externalRules`)."""
    query = "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"
    name = {"matches": f"^{QUEUE_METRIC}$", "as": QUEUE_METRIC}
    per_pod = {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": name,
        "metricsQuery": query,
    }
    per_model = {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",model!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
        "name": name,
        "metricsQuery": query,
    }
    return {"rules": [per_pod], "externalRules": [per_model]}


def adapter_helm_values(spec: DeploymentSpec) -> Manifest:
    """Values for the prometheus-community/prometheus-adapter Helm chart."""
    url, _, port = spec.monitoring.prometheus_url.rpartition(":")
    rules = adapter_rules()
    return {
        "prometheus": {"url": url, "port": int(port)},
        # The chart's default rules would publish every series; CPU for the HPAs comes from metrics-server.
        "rules": {"default": False, "custom": rules["rules"], "external": rules["externalRules"]},
    }
