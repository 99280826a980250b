"""The generator: the checked-in manifests are its output, and its output says what we mean.

What the linters cannot know is checked here: which command each Deployment runs, how the
probes and the termination grace relate to the request timeout, who may talk to whom.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configuration.settings import Settings
from deploy import autoscaling, generate
from deploy.spec import PORT, UID
from tests.deploy.manifests import MANIFESTS, named, of_kind, rendered

MODELS = {"clip": "CLIP", "llava": "LLaVA", "whisper": "Whisper"}


def test_checked_in_manifests_equal_the_generated_ones():
    files = generate.render(generate.build_spec())
    on_disk = {p.relative_to(MANIFESTS).as_posix(): p.read_text() for p in MANIFESTS.rglob("*") if p.is_file()}
    assert sorted(on_disk) == sorted(files), "files added or removed: run `make manifests`"
    stale = [path for path, text in files.items() if on_disk[path] != text]
    assert not stale, f"out of date, run `make manifests`: {stale}"


def test_generate_ignores_the_environment_unless_asked(monkeypatch):
    monkeypatch.setenv("MULTIMODAL_FAMILIES", "clip")
    monkeypatch.setenv("MULTIMODAL_PROFILE", "tiny")
    assert generate.render(generate.build_spec()) == generate.render(generate.build_spec(from_env=False))
    declared = generate.build_spec()
    assert [s.name for s in declared.services] == ["gateway", "clip", "llava", "whisper"]
    from_env = generate.build_spec(profile=None, from_env=True)
    assert (from_env.profile, [s.name for s in from_env.services]) == ("tiny", ["gateway", "clip"])


def test_check_mode_reports_drift(tmp_path: Path, capsys):
    out = tmp_path / "manifests"
    assert generate.main(["--out", str(out)]) == 0
    assert generate.main(["--out", str(out), "--check"]) == 0
    (out / "base" / "clip.yaml").write_text("# edited by hand\n")
    (out / "base" / "stray.yaml").write_text("{}\n")
    assert generate.main(["--out", str(out), "--check"]) == 1
    assert "base/clip.yaml" in capsys.readouterr().err
    generate.main(["--out", str(out)])
    assert not (out / "base" / "stray.yaml").exists()


def test_each_service_runs_its_own_bentoml_service_from_one_image():
    docs = rendered("base")
    for name, bento_service in MODELS.items():
        container = named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][:3] == ["start-http-server", "--service-name", bento_service]
        assert container["image"] == "multimodal-serving:0.1.0"
    gateway = named(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    depends = [gateway["args"][i + 1] for i, arg in enumerate(gateway["args"]) if arg == "--depends"]
    assert depends == [f"{bento}=http://{name}:80" for name, bento in MODELS.items()]
    for name in ("gateway", *MODELS):
        service = named(docs, "Service", name)["spec"]
        assert service["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        container = named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert container["ports"][0]["containerPort"] == PORT == 3000


def test_per_service_images_and_a_family_subset():
    spec = generate.build_spec(images=["registry.example/all:1", "clip=registry.example/multimodal-clip:1"])
    files = generate.render(spec)
    assert "image: registry.example/multimodal-clip:1" in files["base/clip.yaml"]
    assert "image: registry.example/all:1" in files["base/gateway.yaml"]
    only_clip = generate.render(
        generate.deployment_spec(generate.DeclaredSettings(profile="production", families=["clip"]))
    )
    assert "base/llava.yaml" not in only_clip and "base/clip.yaml" in only_clip
    assert "--depends\n        - CLIP=http://clip:80\n        - --host" in only_clip["base/gateway.yaml"]
    assert "LlavaKvCacheUsageHigh" not in only_clip["prometheus/rules.yaml"]


def test_pods_are_hardened_and_write_only_to_their_volumes():
    for deployment in of_kind(rendered("overlays/redis"), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        writable = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {m["name"] for m in container["volumeMounts"] if not m.get("readOnly")} <= writable


def test_model_pods_get_gpus_shared_memory_and_bentoml_a_writable_home():
    docs = rendered("base")
    for name in ("gateway", *MODELS):
        pod = named(docs, "Deployment", name)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {item["name"]: item["value"] for item in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert pod["securityContext"]["runAsUser"] == UID
        # BentoML creates its folders in BENTOML_HOME at start; the image's /home/bentoml holds the bento.
        assert mounts[env["BENTOML_HOME"]] == "bentoml-home" and not env["BENTOML_HOME"].startswith("/home/bentoml")
        assert mounts["/tmp"] == "tmp" and mounts[env["HOME"]] == "model-cache"
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
        resources = container["resources"]
        if name == "gateway":
            assert "nvidia.com/gpu" not in resources["limits"] and "affinity" not in pod
            assert env["MULTIMODAL_DEVICE"] == "cpu"
        else:
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
            terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ]
            assert terms[0]["matchExpressions"][0]["key"].startswith("nvidia.com/gpu.")
            assert env["MULTIMODAL_DEVICE"] == "cuda"
        spread = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
        assert spread == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_original_design_numbers_for_clip():
    docs = rendered("base")
    clip = named(docs, "Deployment", "clip")
    container = clip["spec"]["template"]["spec"]["containers"][0]
    assert clip["spec"]["replicas"] == 6
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    products = clip["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert products["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["NVIDIA-A10G", "Tesla-T4"]
    gateway = named(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    liveness, readiness = gateway["livenessProbe"], gateway["readinessProbe"]
    assert (liveness["httpGet"]["path"], liveness["initialDelaySeconds"], liveness["periodSeconds"]) == (
        "/health",
        60,
        30,
    )
    # The design's /ready, asked for any one family (README, "Faults and readiness"): one family down does not
    # take the others out of the Service.
    assert (readiness["httpGet"]["path"], readiness["initialDelaySeconds"], readiness["periodSeconds"]) == (
        "/ready?require=any",
        30,
        10,
    )
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        spec = hpa["spec"]
        assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 20)
        assert spec["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
        up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
        assert (up["stabilizationWindowSeconds"], up["policies"]) == (
            60,
            [{"type": "Percent", "value": 50, "periodSeconds": 60}],
        )
        assert (down["stabilizationWindowSeconds"], down["policies"]) == (
            300,
            [{"type": "Percent", "value": 10, "periodSeconds": 60}],
        )
    queue = named(docs, "HorizontalPodAutoscaler", "clip")["spec"]["metrics"][1]
    assert queue["external"]["metric"] == {"name": "queue_depth", "selector": {"matchLabels": {"model": "clip"}}}
    assert queue["external"]["target"] == {"type": "AverageValue", "averageValue": "50"}


def _queue_metrics(hpa: dict) -> list[dict]:
    return [metric for metric in hpa["spec"]["metrics"] if metric["type"] != "Resource"]


def test_entry_hpa_scales_on_each_familys_queue_apart_never_on_their_sum():
    # queue_depth counts CLIP calls, Whisper windows and LLaVA generations: one Pods metric per family,
    # selected by `model`, each with its own target. An unselected queue_depth would be their sum.
    queues = _queue_metrics(named(rendered("base"), "HorizontalPodAutoscaler", "gateway"))
    assert [metric["type"] for metric in queues] == ["Pods"] * len(MODELS)
    families = [metric["pods"]["metric"].get("selector", {}).get("matchLabels", {}).get("model") for metric in queues]
    assert sorted(families) == sorted(MODELS), "each served family once, none unselected"
    for metric, family in zip(queues, families, strict=True):
        assert metric["pods"]["metric"] == {"name": "queue_depth", "selector": {"matchLabels": {"model": family}}}
        assert metric["pods"]["target"]["type"] == "AverageValue"
    targets = {
        family: int(metric["pods"]["target"]["averageValue"]) for metric, family in zip(queues, families, strict=True)
    }
    settings = Settings()
    # Each family's own per-pod target (deploy/spec.py, entry_queue_targets) ...
    assert targets == {"clip": 50, "llava": 2 * settings.llava_max_num_seqs, "whisper": settings.whisper_max_batch_size}
    # ... and all of them at once leave an entry pod under QueueDepthHigh's threshold, short of its 429s.
    assert sum(targets.values()) <= 0.8 * settings.max_concurrent_requests
    # KEDA: one Prometheus trigger per family, each with the family's query and threshold.
    scaled = named(rendered("overlays/keda"), "ScaledObject", "gateway")["spec"]
    triggers = [t for t in scaled["triggers"] if t["type"] == "prometheus"]
    assert {t["metadata"]["query"]: t["metadata"]["threshold"] for t in triggers} == {
        f'sum(queue_depth{{namespace="multimodal",service="gateway",model="{family}"}})': str(target)
        for family, target in targets.items()
    }
    assert all(t["metricType"] == "AverageValue" for t in triggers)


def test_entry_queue_targets_follow_the_families_served_and_stay_under_the_concurrency_limit():
    def gateway_targets(**settings: object) -> dict[str, str]:
        spec = generate.deployment_spec(generate.DeclaredSettings(profile="production", **settings))
        hpa = autoscaling.hpa(spec.entry, spec)
        return {
            m["pods"]["metric"]["selector"]["matchLabels"]["model"]: m["pods"]["target"]["averageValue"]
            for m in _queue_metrics(hpa)
        }

    assert gateway_targets(families=["clip", "whisper"]) == {"clip": "50", "whisper": "16"}
    # A larger Whisper batch would let the three families together pass 80 calls per entry pod:
    # every target shrinks in proportion (50, 8, 64 -> 32, 5, 41 for a budget of 80).
    scaled = gateway_targets(whisper_max_batch_size=64)
    assert scaled == {"clip": "32", "llava": "5", "whisper": "41"}
    assert sum(map(int, scaled.values())) <= 80


def test_startup_probes_wait_for_models_and_termination_outlasts_the_longest_request():
    timeout = Settings().request_timeout_seconds
    for deployment in of_kind(rendered("base"), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= (
            600 if deployment["metadata"]["name"] == "llava" else 90
        )
        assert container["livenessProbe"]["httpGet"]["path"] in ("/livez", "/health")  # never inference
        drain = int(container["args"][container["args"].index("--timeout-graceful-shutdown") + 1])
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert drain > timeout
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def _rules(policy: dict) -> tuple[list, list]:
    return policy["spec"].get("ingress", []), policy["spec"].get("egress", [])


def test_network_policies_deny_by_default_and_admit_only_the_entry_service_to_models():
    docs = rendered("base")
    deny = named(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    ingress, egress = _rules(named(docs, "NetworkPolicy", "gateway"))
    assert ingress == [{"ports": [{"protocol": "TCP", "port": PORT}]}]  # from anywhere, one port
    assert not any("ipBlock" in peer for rule in egress for peer in rule.get("to", []))  # no internet by default
    for name in MODELS:
        ingress, egress = _rules(named(docs, "NetworkPolicy", name))
        assert egress == []
        (rule,) = ingress
        callers = rule["from"]
        assert callers[0] == {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/part-of": "multimodal-serving"}
            }
        }
        assert callers[1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
        assert "podSelector" in callers[1]  # Prometheus only, not the whole monitoring namespace


def test_image_fetching_opens_egress_to_public_addresses_only_when_configured():
    settings = generate.DeclaredSettings(
        profile="production", image_fetch_enabled=True, image_fetch_trusted_networks=["10.20.0.0/16"]
    )
    spec = generate.deployment_spec(settings)
    files = generate.render(spec)
    policy = [d for d in yaml.safe_load_all(files["base/gateway.yaml"]) if d and d["kind"] == "NetworkPolicy"][0]
    (fetch,) = [rule for rule in policy["spec"]["egress"] if any("ipBlock" in peer for peer in rule["to"])]
    public, trusted = fetch["to"]
    assert public["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert {"169.254.0.0/16", "10.0.0.0/8", "127.0.0.0/8"} <= set(public["ipBlock"]["except"])
    assert trusted == {"ipBlock": {"cidr": "10.20.0.0/16"}}
    assert {port["port"] for port in fetch["ports"]} == {80, 443}
    settings_map = [d for d in yaml.safe_load_all(files["base/settings.yaml"]) if d][0]["data"]
    assert settings_map["MULTIMODAL_IMAGE_FETCH_ENABLED"] == "true"
    assert settings_map["MULTIMODAL_IMAGE_FETCH_TRUSTED_NETWORKS"] == "10.20.0.0/16"


def test_redis_component_is_reachable_only_from_the_entry_service_and_selected_by_the_url():
    docs = rendered("overlays/redis")
    assert named(docs, "ConfigMap", "multimodal-settings")["data"]["MULTIMODAL_REDIS_URL"] == "redis://redis:6379/0"
    ingress, egress = _rules(named(docs, "NetworkPolicy", "redis"))
    assert egress == [] and ingress[0]["from"] == [
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/part-of": "multimodal-serving"}
            }
        }
    ]
    _, egress = _rules(named(docs, "NetworkPolicy", "gateway-to-redis"))
    assert egress[0]["ports"] == [{"protocol": "TCP", "port": 6379}]
    redis = named(docs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["resources"]["limits"]["memory"] == "3072Mi"
    assert "redis" not in {d["metadata"]["name"] for d in of_kind(rendered("base"), "Deployment")}


def test_milvus_component_selects_the_milvus_library_store_and_opens_only_its_port():
    docs = rendered("overlays/milvus")
    settings = named(docs, "ConfigMap", "multimodal-settings")["data"]
    assert settings["MULTIMODAL_LIBRARY_STORE"] == "milvus"
    assert settings["MULTIMODAL_LIBRARY_MILVUS_URI"] == "http://milvus.milvus.svc.cluster.local:19530"
    policy = named(docs, "NetworkPolicy", "gateway-to-milvus")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "gateway"
    _, egress = _rules(policy)
    assert egress == [
        {
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "milvus"}}}],
            "ports": [{"protocol": "TCP", "port": 19530}],
        }
    ]
    base_settings = named(rendered("base"), "ConfigMap", "multimodal-settings")["data"]
    assert "MULTIMODAL_LIBRARY_STORE" not in base_settings  # the embedded store unless the component is used


@pytest.mark.parametrize("variant", ["overlays/keda", "keda+redis"])
def test_keda_replaces_every_hpa_with_a_scaled_object(variant: str):
    docs = rendered(variant)
    assert of_kind(docs, "HorizontalPodAutoscaler") == []
    scaled = {doc["metadata"]["name"]: doc["spec"] for doc in of_kind(docs, "ScaledObject")}
    assert sorted(scaled) == ["clip", "gateway", "llava", "whisper"]
    clip = scaled["clip"]
    prometheus = [t for t in clip["triggers"] if t["type"] == "prometheus"][0]
    assert prometheus["metadata"]["query"] == 'sum(queue_depth{namespace="multimodal",model="clip"})'
    assert (prometheus["metricType"], prometheus["metadata"]["threshold"]) == ("AverageValue", "50")
    assert (clip["minReplicaCount"], clip["maxReplicaCount"]) == (3, 20)


def test_tiny_profile_runs_on_cpus_with_one_replica(tmp_path: Path):
    out = tmp_path / "tiny"
    assert generate.main(["--profile", "tiny", "--out", str(out)]) == 0
    text = (out / "base" / "llava.yaml").read_text()
    assert "nvidia.com/gpu" not in text and "replicas: 1" in text
    assert "MULTIMODAL_PROFILE: tiny" in (out / "base" / "settings.yaml").read_text()
