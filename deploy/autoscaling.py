"""Autoscaling on CPU and on the per-pod queue depth: HPA with prometheus-adapter, or KEDA.

How the queue metric flows. The entry service counts, per model, the calls it has accepted
and not yet had answered (``queue_depth{model}``, a gauge summed over its worker processes).
Prometheus scrapes it from every entry pod (ServiceMonitor), adding ``namespace``, ``pod`` and
``service`` labels. prometheus-adapter then serves it twice:

- as a custom metric of each pod (``custom.metrics.k8s.io``, ``pods/queue_depth``): the entry
  service's HPA has one such metric per family it serves, selected by ``model`` (the adapter
  adds a metric selector's labels to ``<<.LabelMatchers>>``), each averaged over its own pods
  against that family's target. Families count in different units (CLIP calls of many items,
  Whisper windows, LLaVA generations), so they are never summed; Kubernetes takes the largest
  of the recommendations;
- as an external metric (``external.metrics.k8s.io``, ``queue_depth``, selected by ``model``):
  a model service's HPA takes the namespace's total for its model with an ``AverageValue``
  target, which Kubernetes divides by that model's replica count. The model pods themselves
  hold no queue: requests wait in the entry service's calls, so that is where they are counted.

KEDA's ScaledObject does the same with its Prometheus triggers, one per family on the entry
service (AverageValue divides by the replicas too), and creates the HPA itself; the KEDA
component deletes ours.
"""

from __future__ import annotations

from configuration.families import Family
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


def _queue(service: ServiceSpec) -> list[Manifest]:
    """One queue metric per family the service scales on, each selected by ``model`` with its own target."""
    metrics = []
    for family, depth in service.autoscaling.queue_targets.items():
        metric = {"name": QUEUE_METRIC, "selector": {"matchLabels": {"model": family}}}
        target = {"type": "AverageValue", "averageValue": str(depth)}
        if service.is_entry:  # the family's calls held by each entry pod, averaged over them
            metrics.append({"type": "Pods", "pods": {"metric": metric, "target": target}})
        else:  # the namespace's total for the family, divided by this service's replicas
            metrics.append({"type": "External", "external": {"metric": metric, "target": target}})
    return metrics


def hpa(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(service.name, spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service.name},
            "minReplicas": service.autoscaling.min_replicas,
            "maxReplicas": service.autoscaling.max_replicas,
            "metrics": [_cpu(service), *_queue(service)],
            "behavior": BEHAVIOR,
        },
    }


def queue_query(service: ServiceSpec, family: Family, spec: DeploymentSpec) -> str:
    """The namespace's queue of one family for one service, in PromQL: what KEDA divides by the replica count."""
    where = (
        f'namespace="{spec.namespace}",service="{service.name}",'
        if service.is_entry
        else f'namespace="{spec.namespace}",'
    )
    return f'sum({QUEUE_METRIC}{{{where}model="{family}"}})'


def scaled_object(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    scaling = service.autoscaling
    queues = [
        {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": spec.monitoring.prometheus_url,
                "query": queue_query(service, family, spec),
                "threshold": str(depth),
            },
        }
        for family, depth in scaling.queue_targets.items()
    ]
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
                *queues,
            ],
        },
    }


def _or_zero(where: str) -> str:
    """A 0 for every target Prometheus scrapes where ``where`` says, so that a queue never used is 0, not absent.

    The gateway creates a family's ``queue_depth`` series at its first call to that family. An
    HPA that gets no value for a metric (a family idle since every entry pod started) does not
    scale down at all, and a pod missing from a Pods metric counts as at its target when scaling
    down; so the adapter answers 0 for pods and namespaces that are scraped but never queued.
    """
    return f"sum(0 * (up{{{where}}} == 1)) by (<<.GroupBy>>)"


def adapter_rules() -> dict[str, list[Manifest]]:
    """prometheus-adapter's rules (its config file's `rules` and `externalRules`)."""
    queue = "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"
    namespace = 'namespace="<<index .LabelValuesByName "namespace">>"'
    pods = 'pod=~"<<index .LabelValuesByName "pod">>"'  # the HPA's pods, joined by |
    name = {"matches": f"^{QUEUE_METRIC}$", "as": QUEUE_METRIC}
    # Only series with their `model` label. The entry HPA's metrics select on it: the adapter adds a
    # metric selector's labels (model="clip") to <<.LabelMatchers>>, inside the series selector,
    # so the sum by pod is that family's alone.
    per_pod = {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!="",model!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": name,
        "metricsQuery": f"{queue} or {_or_zero(namespace + ',' + pods)}",
    }
    per_model = {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",model!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
        "name": name,
        "metricsQuery": f"{queue} or {_or_zero(namespace)}",
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
