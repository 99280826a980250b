"""Small helpers every resource builder shares: labels, metadata, checkov skips."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deploy.spec import PART_OF, DeploymentSpec, ServiceSpec

Manifest = dict[str, Any]


def selector(name: str) -> dict[str, str]:
    """The labels that pick one service's pods; never change them (Deployment selectors are immutable)."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": PART_OF}


def labels(service: ServiceSpec) -> dict[str, str]:
    return {**selector(service.name), "app.kubernetes.io/component": "entry" if service.is_entry else "model"}


def metadata(
    name: str,
    spec: DeploymentSpec,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    namespace: str | None = None,
) -> Manifest:
    meta: Manifest = {"name": name, "namespace": namespace or spec.namespace}
    meta["labels"] = {"app.kubernetes.io/part-of": PART_OF, **(labels or {})}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def hardened_container() -> Manifest:
    """A container's security context: no privilege, no escalation, no capabilities, read-only root."""
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def hardened_pod(uid: int) -> Manifest:
    """A pod's security context: the image's own non-root user, the runtime's default seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def checkov_skips(reasons: Mapping[str, str]) -> dict[str, str]:
    """checkov's skip annotations, each with its reason (checkov splits the value at '=')."""
    for reason in reasons.values():
        if "=" in reason:
            raise ValueError(f"checkov would cut this reason at '=': {reason}")
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(sorted(reasons.items()), 1)}


# Checks skipped on every workload, and why.
IMAGE_DIGEST_REASON = (
    "The image is built after these manifests are generated; pin it by digest at deploy time "
    "with kustomize edit set image (deploy/README.md, Image)"
)
