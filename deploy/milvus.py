"""Milvus for the image library: a kustomize Component, off by default.

The embedded library store is one host's files, and each gateway pod's ``$BENTOML_HOME`` is an
emptyDir: on Kubernetes, with several gateway replicas, the library belongs in Milvus. Milvus
itself is not generated here: it is a distributed system (etcd, object storage, a message queue,
query and data nodes) with its own operator and Helm chart, which users install and run
(deploy/README.md, "Image library on Milvus"). This Component points the product at it and opens
the way there: ``MULTIMODAL_LIBRARY_STORE=milvus``, the URI, and an egress NetworkPolicy from the
entry service's pods to Milvus's namespace on its gRPC port.
"""

from __future__ import annotations

from deploy.k8s import Manifest, metadata, selector
from deploy.spec import DeploymentSpec
from deploy.workloads import SETTINGS_CONFIGMAP

# The Helm chart's defaults: release `milvus` in namespace `milvus` names its Service `milvus`.
NAMESPACE = "milvus"
PORT = 19530
URI = f"http://milvus.{NAMESPACE}.svc.cluster.local:{PORT}"


def network_policy(spec: DeploymentSpec) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(f"{spec.entry.name}-to-milvus", spec),
        "spec": {
            "podSelector": {"matchLabels": selector(spec.entry.name)},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}}],
                    "ports": [{"protocol": "TCP", "port": PORT}],
                }
            ],
        },
    }


def settings_patch(spec: DeploymentSpec) -> Manifest:
    """Selects the Milvus store at this URI (a Secret-mounted token can be added the same way)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": SETTINGS_CONFIGMAP, "namespace": spec.namespace},
        "data": {"MULTIMODAL_LIBRARY_STORE": "milvus", "MULTIMODAL_LIBRARY_MILVUS_URI": URI},
    }
