"""What the manifests are made from: a small typed spec per service, derived from the settings.

The product's own settings (``configuration.settings``) decide the timeouts, the families
deployed and the queue each model can hold; the profile decides the sizes: `production` runs
each model service on a GPU with the original design's numbers, `tiny` runs everything on
CPUs with one replica (a kind or minikube cluster). Everything a reader may want to change
for their cluster (namespace, image, GPU models, Prometheus location) is a field here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from configuration.families import FAMILIES, Family
from configuration.settings import Settings

Profile = Literal["tiny", "production"]

PORT = 3000  # BentoML's port in the container (the original design said 8000; BentoML listens on 3000)
SERVICE_PORT = 80
UID = 1034  # the user BentoML's container images run as (bentoml/_internal/container/generate.py)
PART_OF = "multimodal-serving"
DEFAULT_IMAGE = "multimodal-serving:0.1.0"  # the all-in-one bento (bentofile.yaml), tagged with the project's version

# The original design's autoscaling: 3 to 20 replicas, CPU at 70%, queue_depth averaging 50.
DESIGN_QUEUE_DEPTH_PER_POD = 50
PRESTOP_SECONDS = 10  # endpoints are removed from Services while the pod still answers
STREAM_MARGIN_SECONDS = 30  # streamed answers go on past the first byte, which the timeout bounds


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    gpus: int = 0


@dataclass(frozen=True)
class Probe:
    path: str
    period_seconds: int
    timeout_seconds: int
    failure_threshold: int
    initial_delay_seconds: int = 0


@dataclass(frozen=True)
class GpuPlacement:
    """Which GPU nodes a model service may run on (labels from NVIDIA GPU feature discovery)."""

    products: tuple[str, ...] = ()  # any of these `nvidia.com/gpu.product` values
    min_memory_mib: int | None = None  # `nvidia.com/gpu.memory` above this


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    cpu_utilization: int  # percent of the CPU request
    # Per family (queue_depth{model}): its model calls waiting or in a batch, averaged over the
    # scaled pods. Families count in their own units (a CLIP call carries a batch of items, a
    # Whisper call one 30-second window, a LLaVA call one generation), so each has its own target
    # and none is summed with another. A model service has its own family; the entry service one
    # per family it serves, and Kubernetes scales on the largest recommendation.
    queue_targets: Mapping[Family, int]


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # Kubernetes name: Deployment, Service, DNS
    bento_service: str  # the BentoML service's name
    family: Family | None  # None: the entry service
    replicas: int
    resources: Resources
    startup: Probe
    liveness: Probe
    readiness: Probe
    autoscaling: Autoscaling
    gpu: GpuPlacement | None = None

    @property
    def is_entry(self) -> bool:
        return self.family is None


@dataclass(frozen=True)
class Monitoring:
    """Where the Prometheus Operator, Prometheus and Grafana of the cluster are."""

    namespace: str = "monitoring"
    prometheus_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({"app.kubernetes.io/name": "prometheus"})
    )
    # The kube-prometheus-stack chart's Prometheus selects ServiceMonitors and rules by this label.
    selector_labels: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({"release": "kube-prometheus-stack"})
    )
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    scrape_interval: str = "15s"


@dataclass(frozen=True)
class DeploymentSpec:
    settings: Settings
    profile: Profile
    services: tuple[ServiceSpec, ...]
    namespace: str = "multimodal"
    # The all-in-one bento's image runs every service; a model service may have its own
    # (bentos/<family>/: `--image clip=REGISTRY/multimodal-clip:TAG`).
    images: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    monitoring: Monitoring = field(default_factory=Monitoring)
    redis_image: str = "redis:8.2.2"  # 8.2.2 fixes CVE-2025-49844 (Lua use-after-free)
    redis_max_memory_mib: int = 2048

    def image(self, service: ServiceSpec) -> str:
        return self.images.get(service.name, DEFAULT_IMAGE)

    @property
    def entry(self) -> ServiceSpec:
        return next(service for service in self.services if service.is_entry)

    @property
    def models(self) -> tuple[ServiceSpec, ...]:
        return tuple(service for service in self.services if not service.is_entry)

    @property
    def drain_seconds(self) -> int:
        """How long BentoML waits for requests in flight after SIGTERM."""
        return math.ceil(self.settings.request_timeout_seconds) + STREAM_MARGIN_SECONDS

    @property
    def termination_grace_seconds(self) -> int:
        """Longer than the preStop pause plus the drain, so the kubelet never kills a request."""
        return PRESTOP_SECONDS + self.drain_seconds + 10


# Per-service sizes by profile.

BENTO_NAMES: dict[str, str] = {"gateway": "Gateway", "clip": "CLIP", "llava": "LLaVA", "whisper": "Whisper"}

# GPUs the original design named for CLIP; Whisper large-v3 (about 10 GB in fp16) fits them too.
SMALL_GPUS = GpuPlacement(products=("NVIDIA-A10G", "Tesla-T4"))
# LLaVA-1.5-7B in fp16 is 14 GB of weights before its KV cache: at least an A10G's 24 GB.
LARGE_GPUS = GpuPlacement(min_memory_mib=20_000)

PRODUCTION_RESOURCES: dict[str, Resources] = {
    "gateway": Resources("2", "4", "2Gi", "4Gi"),  # decodes images and audio, computes log-mels
    "clip": Resources("2", "4", "8Gi", "16Gi", gpus=1),  # the original design's numbers
    "llava": Resources("4", "8", "32Gi", "48Gi", gpus=1),
    "whisper": Resources("2", "4", "8Gi", "16Gi", gpus=1),
}
TINY_RESOURCES: dict[str, Resources] = {
    "gateway": Resources("500m", "2", "1Gi", "2Gi"),
    "clip": Resources("500m", "2", "1Gi", "2Gi"),
    "llava": Resources("1", "2", "4Gi", "6Gi"),  # vLLM's CPU KV cache (1 GiB) lives in host memory
    "whisper": Resources("500m", "2", "1Gi", "2Gi"),
}
PRODUCTION_REPLICAS = {"gateway": 3, "clip": 6, "llava": 3, "whisper": 3}
GATEWAY_READINESS_PATH = "/ready?require=any"
# Model load, worst case, in seconds: the startup probe allows 1.5 times this.
MODEL_LOAD_SECONDS = {"gateway": 60, "clip": 180, "llava": 600, "whisper": 180}


# Share of MULTIMODAL_MAX_CONCURRENT_REQUESTS that an entry pod's calls, all families together,
# should stay under: past it QueueDepthHigh warns (deploy/alerts.py), and at the limit 429s come.
ENTRY_QUEUE_SHARE = 0.8


def queue_target(family: Family, settings: Settings) -> int:
    """Queue depth per model pod the autoscaler aims at, from what one pod batches at once."""
    if family == "llava":
        return 2 * settings.llava_max_num_seqs  # one running batch, one waiting
    if family == "whisper":
        return settings.whisper_max_batch_size
    return DESIGN_QUEUE_DEPTH_PER_POD


def entry_queue_targets(families: list[Family], settings: Settings) -> dict[Family, int]:
    """Per entry pod, each family's calls the entry service's autoscaler aims at.

    The family's own per-pod target: the backlog one model pod of that family is sized to have
    waiting, in that family's unit, so an entry pod scales out on the busiest family alone
    (a CLIP burst no longer hides behind an idle LLaVA, nor do 8 LLaVA generations count as
    8 of CLIP's 50 calls). Every family at its target at once must still leave an entry pod short
    of its concurrency limit, since that limit counts all families together: at the defaults
    50 + 8 + 16 = 74 calls, under QueueDepthHigh's 80 and the 100 past which it answers 429.
    Settings that push the sum over that share scale every target down in proportion.
    """
    own = {family: queue_target(family, settings) for family in families}
    budget = math.floor(ENTRY_QUEUE_SHARE * settings.max_concurrent_requests)
    total = sum(own.values())
    if total <= budget:
        return own
    return {family: max(1, target * budget // total) for family, target in own.items()}


def _probes(name: str) -> tuple[Probe, Probe, Probe]:
    startup_failures = math.ceil(1.5 * MODEL_LOAD_SECONDS[name] / 10)
    if name == "gateway":
        # The original design: liveness /health after 60 s every 30 s, readiness /ready after 30 s every 10 s.
        # Readiness asks for any one family: a family that is down is down for every gateway pod alike
        # (they share its model service), so taking them out of the Service would only stop the families
        # that still work. The gateway answers the down family's routes with 503 and Retry-After.
        return (
            Probe("/health", period_seconds=10, timeout_seconds=5, failure_threshold=startup_failures),
            Probe("/health", period_seconds=30, timeout_seconds=5, failure_threshold=3, initial_delay_seconds=60),
            Probe(
                GATEWAY_READINESS_PATH,
                period_seconds=10,
                timeout_seconds=6,
                failure_threshold=3,
                initial_delay_seconds=30,
            ),
        )
    return (
        Probe("/readyz", period_seconds=10, timeout_seconds=5, failure_threshold=startup_failures),
        Probe("/livez", period_seconds=30, timeout_seconds=10, failure_threshold=3),
        Probe("/readyz", period_seconds=10, timeout_seconds=5, failure_threshold=3),
    )


def service_spec(name: str, profile: Profile, settings: Settings) -> ServiceSpec:
    production = profile == "production"
    served = [family for family in FAMILIES if family in settings.families]
    startup, liveness, readiness = _probes(name)
    family: Family | None = None if name == "gateway" else name  # type: ignore[assignment]
    resources = (PRODUCTION_RESOURCES if production else TINY_RESOURCES)[name]
    gpu = None
    if production and family is not None:
        gpu = LARGE_GPUS if family == "llava" else SMALL_GPUS
    return ServiceSpec(
        name=name,
        bento_service=BENTO_NAMES[name],
        family=family,
        replicas=PRODUCTION_REPLICAS[name] if production else 1,
        resources=resources,
        startup=startup,
        liveness=liveness,
        readiness=readiness,
        autoscaling=Autoscaling(
            min_replicas=3 if production else 1,
            max_replicas=20 if production else 3,
            cpu_utilization=70,
            queue_targets=MappingProxyType(
                entry_queue_targets(served, settings) if family is None else {family: queue_target(family, settings)}
            ),
        ),
        gpu=gpu,
    )


def deployment_spec(settings: Settings, images: Mapping[str, str] | None = None) -> DeploymentSpec:
    """The entry service and one model service per family the settings enable, sized by their profile."""
    profile = settings.profile
    names = ["gateway", *(family for family in FAMILIES if family in settings.families)]
    services = tuple(service_spec(name, profile, settings) for name in names)
    return DeploymentSpec(
        settings=settings, profile=profile, services=services, images=MappingProxyType(dict(images or {}))
    )
