"""Redis for the shared embedding cache: a kustomize Component, off by default.

A cache, not a store: no persistence, ``allkeys-lru`` eviction under a ``maxmemory`` set below
the container's memory limit, one replica (losing it costs misses, never requests: the
product treats every Redis failure as a miss). Its default user may run only the commands the
cache sends (MGET, SET, PING): no Lua scripting (CVE-2025-49844) and no administration. Only
the entry service's pods may connect.
"""

from __future__ import annotations

from deploy.k8s import Manifest, checkov_skips, hardened_container, hardened_pod, metadata, selector
from deploy.spec import DeploymentSpec
from deploy.workloads import SERVICE_ACCOUNT, SETTINGS_CONFIGMAP

NAME = "redis"
PORT = 6379
REDIS_UID = 999  # the official image's redis user
URL = f"redis://{NAME}:{PORT}/0"


def redis_conf(spec: DeploymentSpec) -> str:
    return "\n".join(
        [
            "# Embedding cache: evict least recently used keys at maxmemory; keep nothing on disk.",
            "bind * -::*",
            f"port {PORT}",
            "protected-mode no",  # no password: the NetworkPolicy admits only the entry service
            f"maxmemory {spec.redis_max_memory_mib}mb",
            "maxmemory-policy allkeys-lru",
            'save ""',
            "appendonly no",
            "dir /data",
            # What services/clip/cache.py sends, and PING for the probe; nothing else.
            "user default on nopass ~* &* -@all +mget +set +ping",
            "",
        ]
    )


def _labels() -> dict[str, str]:
    return {**selector(NAME), "app.kubernetes.io/component": "cache"}


def configmap(spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata("redis-config", spec, _labels()),
        "data": {"redis.conf": redis_conf(spec)},
    }


def deployment(spec: DeploymentSpec) -> Manifest:
    limit_mib = spec.redis_max_memory_mib * 3 // 2  # room for fragmentation, buffers and the allocator
    ping = {"exec": {"command": ["redis-cli", "-p", str(PORT), "ping"]}}
    container = {
        "name": NAME,
        "image": spec.redis_image,
        "imagePullPolicy": "Always",
        "args": ["redis-server", "/etc/redis/redis.conf"],
        "ports": [{"name": "redis", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "250m", "memory": f"{limit_mib}Mi"},
            "limits": {"cpu": "1", "memory": f"{limit_mib}Mi"},
        },
        "livenessProbe": {
            "tcpSocket": {"port": "redis"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": ping | {"periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "securityContext": hardened_container(),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/redis", "readOnly": True},
            {"name": "data", "mountPath": "/data"},
        ],
    }
    pod = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": hardened_pod(REDIS_UID),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": "redis-config"}},
            {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    skips = {
        "CKV_K8S_43": "The public redis image is pinned by tag here; pin its digest at deploy time "
        "with kustomize edit set image",
        "CKV_K8S_40": f"The official redis image runs as its own user, uid {REDIS_UID}, who owns its files",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(NAME, spec, _labels(), checkov_skips(skips)),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(NAME)},
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": _labels()}, "spec": pod},
        },
    }


def service(spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(NAME, spec, _labels()),
        "spec": {
            "selector": selector(NAME),
            "ports": [{"name": "redis", "port": PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def network_policies(spec: DeploymentSpec) -> list[Manifest]:
    entry = selector(spec.entry.name)
    port = [{"protocol": "TCP", "port": PORT}]
    inbound = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(NAME, spec),
        "spec": {
            "podSelector": {"matchLabels": selector(NAME)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": entry}}], "ports": port}],
            "egress": [],
        },
    }
    outbound = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(f"{spec.entry.name}-to-redis", spec),
        "spec": {
            "podSelector": {"matchLabels": entry},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": selector(NAME)}}], "ports": port}],
        },
    }
    return [inbound, outbound]


def settings_patch(spec: DeploymentSpec) -> Manifest:
    """Points the product at this Redis (MULTIMODAL_REDIS_URL selects the Redis cache)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": SETTINGS_CONFIGMAP, "namespace": spec.namespace},
        "data": {"MULTIMODAL_REDIS_URL": URL},
    }
