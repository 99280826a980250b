"""The alerts and the autoscaling queries, run by promtool against series shaped like ours.

- ``promtool check rules``: the rules parse, in the plain rule file and in the PrometheusRule.
- ``promtool test rules tests/deploy/alerts_test.yaml``: each alert fires past its ``for:``
  on the input that should fire it, and stays quiet before that and on inputs that should not.
- prometheus-adapter's and KEDA's queries, templated as those tools template them, give each
  HPA the number it is meant to divide: per entry pod, and per model in the namespace.
"""

from __future__ import annotations

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


def _adapter(query: str, series: str, matchers: str, group_by: str) -> str:
    """prometheus-adapter's Go-template substitution of a metricsQuery."""
    return (
        query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by)
    )


def test_autoscaling_queries_count_the_queue_the_hpas_divide(tmp_path: Path):
    values = checked_in("prometheus-adapter/values.yaml")
    (per_pod,) = values["rules"]["custom"]
    (per_model,) = values["rules"]["external"]
    hpas = {doc["metadata"]["name"]: doc for doc in rendered("base") if doc["kind"] == "HorizontalPodAutoscaler"}
    assert hpas["gateway"]["spec"]["metrics"][1]["pods"]["metric"]["name"] == per_pod["name"]["as"]
    assert hpas["clip"]["spec"]["metrics"][1]["external"]["metric"]["name"] == per_model["name"]["as"]
    keda = {doc["metadata"]["name"]: doc for doc in rendered("overlays/keda") if doc["kind"] == "ScaledObject"}
    keda_query = {
        name: next(t for t in doc["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]["query"]
        for name, doc in keda.items()
    }
    series = "queue_depth"
    expressions = [
        # What the HPA of the entry service reads for two of its pods.
        (
            _adapter(per_pod["metricsQuery"], series, 'namespace="multimodal",pod=~"gateway-a|gateway-b"', "pod"),
            [('{pod="gateway-a"}', 90), ('{pod="gateway-b"}', 70)],
        ),
        # What the HPA of the CLIP service reads (before Kubernetes divides it by CLIP's replicas).
        (
            _adapter(per_model["metricsQuery"], series, 'namespace="multimodal",model="clip"', "namespace"),
            [('{namespace="multimodal"}', 120)],
        ),
        (keda_query["clip"], [("{}", 120)]),
        (keda_query["llava"], [("{}", 40)]),
        (keda_query["gateway"], [("{}", 160)]),
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
