"""Per service: the Deployment, its Service and PodDisruptionBudget; and the shared Namespace,
ServiceAccount and settings ConfigMap.

One image (the all-in-one bento) runs every service. BentoML's container entrypoint turns
``start-http-server ...`` into ``python -m bentoml_cli._internal.start start-http-server ...
$BENTO_PATH``: a model service serves alone with ``--service-name``, and the entry service
reaches the model services' Kubernetes Services through ``--depends NAME=URL``.
"""

from __future__ import annotations

from pydantic import AliasChoices

from configuration.settings import PREFIX, Settings
from deploy.k8s import (
    IMAGE_DIGEST_REASON,
    Manifest,
    checkov_skips,
    hardened_container,
    hardened_pod,
    labels,
    metadata,
    selector,
)
from deploy.spec import (
    PART_OF,
    PORT,
    PRESTOP_SECONDS,
    SERVICE_PORT,
    UID,
    DeploymentSpec,
    Probe,
    ServiceSpec,
)

SETTINGS_CONFIGMAP = "multimodal-settings"
SERVICE_ACCOUNT = "multimodal-serving"

# Writable paths under a read-only root file system. BENTOML_HOME moves off the image's
# /home/bentoml (which holds the bento itself) to a volume: BentoML creates bentos/, envs/,
# models/, tmp/ and prometheus_multiproc_dir/ there at start.
STATE_DIR = "/var/lib/bentoml"
CACHE_DIR = "/var/cache/multimodal"  # HOME and XDG_CACHE_HOME: Hugging Face, torch, Triton, vLLM caches


def namespace(spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": spec.namespace,
            "labels": {
                "app.kubernetes.io/part-of": PART_OF,
                # Pod Security Admission: every pod here must meet the `restricted` profile.
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            },
        },
    }


def service_account(spec: DeploymentSpec) -> Manifest:
    """One account for the product's pods, without an API token: they never call the Kubernetes API."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(SERVICE_ACCOUNT, spec),
        "automountServiceAccountToken": False,
    }


def _env_name(settings: Settings, field: str) -> str:
    alias = type(settings).model_fields[field].validation_alias
    return str(alias.choices[0]) if isinstance(alias, AliasChoices) else PREFIX + field.upper()


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """The product settings this deployment sets: profile, families, and any changed from their defaults."""
    chosen = settings.model_dump(exclude_defaults=True, exclude_none=True) | {
        "profile": settings.profile,
        "families": settings.families,
    }
    return {_env_name(settings, field): _env_value(value) for field, value in sorted(chosen.items())}


def settings_configmap(spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(SETTINGS_CONFIGMAP, spec),
        "data": settings_env(spec.settings),
    }


def _probe(probe: Probe) -> Manifest:
    out: Manifest = {"httpGet": {"path": probe.path, "port": "http"}}
    if probe.initial_delay_seconds:
        out["initialDelaySeconds"] = probe.initial_delay_seconds
    return out | {
        "periodSeconds": probe.period_seconds,
        "timeoutSeconds": probe.timeout_seconds,
        "failureThreshold": probe.failure_threshold,
    }


def start_args(service: ServiceSpec, spec: DeploymentSpec) -> list[str]:
    """BentoML's (hidden) start command for one service of the bento, as the container's arguments."""
    args = ["start-http-server"]
    if service.is_entry:
        for model in spec.models:
            args += ["--depends", f"{model.bento_service}=http://{model.name}:{SERVICE_PORT}"]
    else:
        args += ["--service-name", service.bento_service]
    return args + [
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--timeout-graceful-shutdown", str(spec.drain_seconds),
    ]  # fmt: skip


def _env(service: ServiceSpec) -> list[Manifest]:
    values = {
        "MULTIMODAL_DEVICE": "cuda" if service.resources.gpus else "cpu",
        "BENTOML_HOME": STATE_DIR,
        "HOME": CACHE_DIR,
        "XDG_CACHE_HOME": CACHE_DIR,
        # Models are inside the image and egress is denied: never wait on a hub or a tracker.
        "HF_HUB_OFFLINE": "1",
        "BENTOML_DO_NOT_TRACK": "true",
        "DO_NOT_TRACK": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    return [{"name": name, "value": value} for name, value in values.items()]


def _resources(service: ServiceSpec) -> Manifest:
    r = service.resources
    requests = {"cpu": r.cpu_request, "memory": r.memory_request}
    limits = {"cpu": r.cpu_limit, "memory": r.memory_limit}
    if r.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(r.gpus)
    return {"requests": requests, "limits": limits}


def _volumes(service: ServiceSpec) -> tuple[list[Manifest], list[Manifest]]:
    production_gpu = service.resources.gpus > 0
    volumes = [
        ("tmp", "/tmp", {"sizeLimit": "4Gi"}),  # uploads spooled to disk, ffmpeg, BentoML's Unix sockets
        ("bentoml-home", STATE_DIR, {"sizeLimit": "1Gi"}),
        ("model-cache", CACHE_DIR, {"sizeLimit": "20Gi" if production_gpu else "2Gi"}),
        ("dshm", "/dev/shm", {"medium": "Memory", "sizeLimit": "2Gi"}),  # torch and vLLM shared memory
    ]
    mounts = [{"name": name, "mountPath": path} for name, path, _ in volumes]
    return [{"name": name, "emptyDir": source} for name, _, source in volumes], mounts


def _affinity(service: ServiceSpec) -> Manifest | None:
    if service.gpu is None:
        return None
    expressions: list[Manifest] = []
    if service.gpu.products:
        expressions.append({"key": "nvidia.com/gpu.product", "operator": "In", "values": list(service.gpu.products)})
    if service.gpu.min_memory_mib is not None:
        expressions.append(
            {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(service.gpu.min_memory_mib)]}
        )
    terms = {"nodeSelectorTerms": [{"matchExpressions": expressions}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": terms}}


def _spread(service: ServiceSpec) -> list[Manifest]:
    """Across hosts, then zones; ScheduleAnyway, so that scarce GPU nodes never leave a pod Pending."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector(service.name)},
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def container(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    _, mounts = _volumes(service)
    return {
        "name": service.name,
        "image": spec.image(service),
        "imagePullPolicy": "Always",
        "args": start_args(service, spec),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": SETTINGS_CONFIGMAP}}],
        "env": _env(service),
        "resources": _resources(service),
        "startupProbe": _probe(service.startup),
        "livenessProbe": _probe(service.liveness),
        "readinessProbe": _probe(service.readiness),
        # Endpoints controllers and load balancers stop sending before BentoML stops accepting.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "securityContext": hardened_container(),
        "volumeMounts": mounts,
    }


DEPLOYMENT_SKIPS = {
    "CKV_K8S_43": IMAGE_DIGEST_REASON,
    "CKV_K8S_40": (
        f"BentoML images run as their own user, uid {UID}, who owns the bento and its virtualenv; another "
        "uid needs a custom Dockerfile template (bento__uid_gid) and getpwuid() entries for torch"
    ),
}


def deployment(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    volumes, _ = _volumes(service)
    pod: Manifest = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no *_SERVICE_HOST/_PORT variables: a Service called redis would set REDIS_PORT
        "terminationGracePeriodSeconds": spec.termination_grace_seconds,
        "securityContext": hardened_pod(UID),
        "containers": [container(service, spec)],
        "volumes": volumes,
        "topologySpreadConstraints": _spread(service),
    }
    if (affinity := _affinity(service)) is not None:
        pod["affinity"] = affinity
        # GPU node pools are commonly tainted so that only GPU workloads land there.
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(service.name, spec, labels(service), checkov_skips(DEPLOYMENT_SKIPS)),
        "spec": {
            # The starting size; the HorizontalPodAutoscaler owns it from then on.
            "replicas": service.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(service.name)},
            # A GPU pod cannot start until an old one frees its GPU: never surge.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0 if service.resources.gpus else 1, "maxUnavailable": 1},
            },
            "template": {"metadata": {"labels": labels(service)}, "spec": pod},
        },
    }


def service(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(service.name, spec, labels(service)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(service.name),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(service: ServiceSpec, spec: DeploymentSpec) -> Manifest:
    """One pod of each service at a time may be evicted by drains and upgrades.

    (`unhealthyPodEvictionPolicy: AlwaysAllow` would let drains evict pods that never became
    ready; it is not in Kubernetes 1.25's schema, the oldest version these manifests support.)
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(service.name, spec, labels(service)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(service.name)}},
    }
