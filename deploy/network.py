"""NetworkPolicies: deny by default; the entry service is the only way in.

Model services accept pickle from their callers (BentoML's inter-service protocol), so only
the entry service's pods (and Prometheus, for ``/metrics``) may reach them, and they reach
nothing. The entry service may reach the model services and DNS, and the internet on 80/443
only when remote image fetching is on (``MULTIMODAL_IMAGE_FETCH_ENABLED``), never private,
link-local or metadata addresses unless listed in ``MULTIMODAL_IMAGE_FETCH_TRUSTED_NETWORKS``.
"""

from __future__ import annotations

from deploy.k8s import Manifest, metadata, selector
from deploy.spec import PORT, DeploymentSpec, ServiceSpec

# Addresses a fetched image URL must never reach (the service checks them too: services/common/image_fetch.py).
NON_PUBLIC_IPV4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",
    "192.168.0.0/16",
)
DNS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def _policy(name: str, spec: DeploymentSpec, pod_labels: dict[str, str], body: Manifest) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, spec),
        "spec": {"podSelector": {"matchLabels": pod_labels}, **body},
    }


def default_deny(spec: DeploymentSpec) -> Manifest:
    policy = _policy("default-deny", spec, {}, {"policyTypes": ["Ingress", "Egress"]})
    policy["spec"]["podSelector"] = {}  # every pod in the namespace
    return policy


def _http_port() -> list[Manifest]:
    return [{"protocol": "TCP", "port": PORT}]


def _image_fetch_egress(spec: DeploymentSpec) -> list[Manifest]:
    settings = spec.settings
    if not settings.image_fetch_enabled:
        return []
    public = {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(NON_PUBLIC_IPV4)}}
    trusted = [{"ipBlock": {"cidr": cidr}} for cidr in settings.image_fetch_trusted_networks]
    ports = [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 443}]
    return [{"to": [public, *trusted], "ports": ports}]


def entry_policy(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    """Anyone may call the entry service; it may call the model services, DNS and, if configured, image hosts."""
    models = [model.name for model in spec.models]
    to_models = {
        "to": [
            {
                "podSelector": {
                    "matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": models}]
                }
            }
        ],
        "ports": _http_port(),
    }
    return _policy(
        service.name,
        spec,
        selector(service.name),
        {
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": _http_port()}],
            "egress": [to_models, DNS, *_image_fetch_egress(spec)],
        },
    )


def model_policy(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    """Only the entry service and Prometheus may call a model service; it calls no one."""
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": spec.monitoring.namespace}},
        "podSelector": {"matchLabels": dict(spec.monitoring.prometheus_pod_labels)},
    }
    callers = [{"podSelector": {"matchLabels": selector(spec.entry.name)}}, prometheus]
    return _policy(
        service.name,
        spec,
        selector(service.name),
        {"policyTypes": ["Ingress", "Egress"], "ingress": [{"from": callers, "ports": _http_port()}], "egress": []},
    )


def network_policy(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    return entry_policy(service, spec) if service.is_entry else model_policy(service, spec)
