"""The alerts and the autoscaling queries, run by promtool against series shaped like ours.

- ``promtool check rules``: the rules parse, in the plain rule file and in the PrometheusRule.
- ``promtool test rules tests/deploy/alerts_test.yaml``: each alert fires past its ``for:``
  on the input that should fire it, and stays quiet before that and on inputs that should not.
- prometheus-adapter's and KEDA's queries, templated as those tools template them, give each
  HPA the number it is meant to divide: per entry pod, and per model in the namespace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.spec import PART_OF
from tests.deploy.manifests import MANIFESTS, checked_in, named, rendered

TESTS = Path(__file__).parent / "alerts_test.yaml"
RULES = MANIFESTS / "prometheus" / "rules.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make test` installs the Debian package prometheus")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120)


def test_rules_parse(tmp_path: Path):
    run = promtool("check", "rules", str(RULES))
    assert run.returncode == 0, run.stdout + run.stderr
    # The PrometheusRule the cluster gets holds the same groups (its spec is a rule file).
    rule = named(rendered("base"), "PrometheusRule", PART_OF)
    assert rule["spec"] == checked_in("prometheus/rules.yaml")
    extracted = tmp_path / "spec.yaml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    run = promtool("check", "rules", str(extracted))
    assert run.returncode == 0, run.stdout + run.stderr


def test_each_alert_fires_when_it_should_and_only_then():
    run = promtool("test", "rules", str(TESTS))
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = {rule["alert"] for group in checked_in("prometheus/rules.yaml")["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - fired == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (fired | quiet) - alerts == set(), "tests of alerts that no longer exist"


def _adapter(query: str, series: str, matchers: dict[str, str], group_by: str) -> str:
    """prometheus-adapter's Go-template substitution of a metricsQuery.

    ``matchers``: label to value (pod names joined by |), in the order the adapter writes them:
    the metric selector's labels, then the namespace, then the resource (pkg/naming/metrics_query.go).
    """
    label_matchers = ",".join(f'{k}=~"{v}"' if "|" in v else f'{k}="{v}"' for k, v in matchers.items())
    query = re.sub(r'<<index \.LabelValuesByName "(\w+)">>', lambda m: matchers.get(m.group(1), ""), query)
    return (
        query.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def _selected_model(metric: dict) -> str:
    return metric["selector"]["matchLabels"]["model"]


def test_autoscaling_queries_count_the_queue_the_hpas_divide(tmp_path: Path):
    values = checked_in("prometheus-adapter/values.yaml")
    (per_pod,) = values["rules"]["custom"]
    (per_model,) = values["rules"]["external"]
    hpas = {doc["metadata"]["name"]: doc for doc in rendered("base") if doc["kind"] == "HorizontalPodAutoscaler"}
    gateway = {
        _selected_model(m["pods"]["metric"]): m["pods"]["metric"]
        for m in hpas["gateway"]["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert sorted(gateway) == ["clip", "llava", "whisper"]
    assert {metric["name"] for metric in gateway.values()} == {per_pod["name"]["as"]}
    (clip,) = [m["external"]["metric"] for m in hpas["clip"]["spec"]["metrics"] if m["type"] == "External"]
    assert (clip["name"], _selected_model(clip)) == (per_model["name"]["as"], "clip")
    keda = {doc["metadata"]["name"]: doc for doc in rendered("overlays/keda") if doc["kind"] == "ScaledObject"}
    keda_query = {
        (name, re.search(r'model="(\w+)"', t["metadata"]["query"]).group(1)): t["metadata"]["query"]
        for name, doc in keda.items()
        for t in doc["spec"]["triggers"]
        if t["type"] == "prometheus"
    }
    series = "queue_depth"
    pods = {"namespace": "multimodal", "pod": "gateway-a|gateway-b|gateway-c"}
    expressions = [
        # What the HPA of the entry service reads for two of its pods, one family at a time: the
        # HPA's metric selector becomes a label matcher. A pod that never called a family reads 0; one
        # that Prometheus does not scrape (gateway-c, down) reads nothing, as before.
        (
            _adapter(per_pod["metricsQuery"], series, {"model": "clip"} | pods, "pod"),
            [('{pod="gateway-a"}', 50), ('{pod="gateway-b"}', 70)],
        ),
        (
            _adapter(per_pod["metricsQuery"], series, {"model": "llava"} | pods, "pod"),
            [('{pod="gateway-a"}', 40), ('{pod="gateway-b"}', 0)],
        ),
        (
            _adapter(per_pod["metricsQuery"], series, {"model": "whisper"} | pods, "pod"),
            [('{pod="gateway-a"}', 0), ('{pod="gateway-b"}', 0)],
        ),
        # What the HPA of the CLIP service reads (before Kubernetes divides it by CLIP's replicas);
        # Whisper, never called, reads 0 rather than nothing.
        (
            _adapter(per_model["metricsQuery"], series, {"model": "clip", "namespace": "multimodal"}, "namespace"),
            [('{namespace="multimodal"}', 120)],
        ),
        (
            _adapter(per_model["metricsQuery"], series, {"model": "whisper", "namespace": "multimodal"}, "namespace"),
            [('{namespace="multimodal"}', 0)],
        ),
        (keda_query["clip", "clip"], [("{}", 120)]),
        (keda_query["llava", "llava"], [("{}", 40)]),
        (keda_query["gateway", "clip"], [("{}", 120)]),
        (keda_query["gateway", "llava"], [("{}", 40)]),
        (f"count({per_pod['seriesQuery']})", [("{}", 4)]),
    ]
    labels = 'namespace="{ns}",pod="{pod}",service="gateway",model="{model}"'
    input_series = [
        {"series": series + "{" + labels.format(ns="multimodal", pod=pod, model=model) + "}", "values": f"{value}x10"}
        for pod, model, value in [("gateway-a", "clip", 50), ("gateway-a", "llava", 40), ("gateway-b", "clip", 70)]
    ]
    # Another deployment of the product in another namespace must not count.
    input_series.append(
        {"series": series + "{" + labels.format(ns="staging", pod="gateway-a", model="clip") + "}", "values": "500x10"}
    )
    # Prometheus's own series for every target it scrapes; gateway-c is not scraped (down).
    input_series += [
        {"series": f'up{{namespace="multimodal",pod="{pod}",service="gateway"}}', "values": f"{up}x10"}
        for pod, up in [("gateway-a", 1), ("gateway-b", 1), ("gateway-c", 0)]
    ]
    tests = {
        "rule_files": [str(tmp_path / "none.yaml")],
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "5m",
                        "exp_samples": [{"labels": lab, "value": val} for lab, val in samples],
                    }
                    for expr, samples in expressions
                ],
            }
        ],
    }
    (tmp_path / "none.yaml").write_text("groups: []\n")
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    run = promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert run.returncode == 0, run.stdout + run.stderr
