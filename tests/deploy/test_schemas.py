"""Every rendered object validates strictly against Kubernetes 1.25 and 1.32 (the original design's range).

kubernetes-validate bundles the built-in kinds' OpenAPI schemas; strict mode rejects unknown
fields too. It has no schema for custom resources (ServiceMonitor, PrometheusRule, KEDA's
ScaledObject) and only warns about them, so those are checked here by hand against the fields
their operators require, and against the objects they point at.
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.deploy.manifests import VARIANTS, of_kind, rendered

VERSIONS = ("1.25.0", "1.32.0")
CUSTOM = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_built_in_kinds_validate_strictly(variant: str, version: str):
    failures = []
    for doc in rendered(variant):
        if doc["kind"] in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(
                f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            failures.append(f"{doc['kind']}: {error.message}")
    assert not failures, "\n".join(failures)


def test_the_validator_is_strict():
    """An unknown field, and a field newer than 1.25, fail: the test above can fail."""
    deployment = copy.deepcopy(of_kind(rendered("base"), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["unknownField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.32.0", strict=True)
    budget = copy.deepcopy(of_kind(rendered("base"), "PodDisruptionBudget")[0])
    budget["spec"]["unhealthyPodEvictionPolicy"] = "AlwaysAllow"  # Kubernetes 1.26+
    kubernetes_validate.validate(budget, "1.32.0", strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(budget, "1.25.0", strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_have_the_fields_their_operators_require(variant: str):
    docs = rendered(variant)
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    services = {d["metadata"]["name"]: d for d in of_kind(docs, "Service")}
    for kind, api_version in CUSTOM.items():
        for doc in of_kind(docs, kind):
            assert doc["apiVersion"] == api_version
            assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "multimodal"
    (monitor,) = of_kind(docs, "ServiceMonitor")
    selected = [
        s for s in services.values()
        if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        and s["metadata"]["labels"].get("app.kubernetes.io/component") in ("entry", "model")
    ]  # fmt: skip
    assert sorted(s["metadata"]["name"] for s in selected) == ["clip", "gateway", "llava", "whisper"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)
    (rule,) = of_kind(docs, "PrometheusRule")
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert set(item) >= {"alert", "expr", "for", "labels", "annotations"}
            assert item["labels"]["severity"] in ("critical", "warning", "info")
    for scaled in of_kind(docs, "ScaledObject"):
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] in ("cpu", "prometheus") and trigger["metadata"]
            if trigger["type"] == "prometheus":
                assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
