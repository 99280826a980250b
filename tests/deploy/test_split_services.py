"""The Deployments' own commands, run as processes: one per service, as the pods run them.

Each container's arguments and environment are taken from the generated manifests (`tiny`
profile) and run the way BentoML's container entrypoint runs them
(``python -m bentoml_cli._internal.start ARGS $BENTO_PATH``), with only what a laptop must
change: loopback addresses and free ports instead of Service names and port 3000, temporary
folders for the volumes. Then the probes the manifests point at answer, every family answers
through the entry service, and each service's ``/metrics`` holds the series the autoscaling
and the alerts expect from that pod.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from deploy import generate
from tests.conftest import REPO, Process, free_port, start, wait_until
from tests.deploy.test_metrics_scrape import wav_bytes
from tests.helpers import b64, chat_body, data_url, png_bytes, random_image

pytestmark = pytest.mark.integration
BENTO = "services.gateway:Gateway"  # $BENTO_PATH: the source tree stands in for the built bento


def _documents(folder: Path, kind: str) -> dict[str, dict]:
    docs = [d for path in sorted((folder / "base").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _local_args(args: list[str], port: int, ports: dict[str, int]) -> list[str]:
    local = list(args)
    local[local.index("--port") + 1] = str(port)
    local[local.index("--host") + 1] = "127.0.0.1"
    for i, arg in enumerate(local):
        if i and local[i - 1] == "--depends":
            bento_service, url = arg.split("=", 1)
            name = url.removeprefix("http://").split(":")[0]
            local[i] = f"{bento_service}=http://127.0.0.1:{ports[name]}"
    return local


class SplitProduct:
    def __init__(self, tmp: Path, model_store: Path) -> None:
        manifests = tmp / "manifests"
        # As `--profile tiny`, with a generous request timeout (a loaded CI machine must not 504).
        settings = generate.DeclaredSettings(profile="tiny", request_timeout_seconds=300)
        generate.write(generate.render(generate.deployment_spec(settings)), manifests)
        self.deployments = _documents(manifests, "Deployment")
        self.settings = _documents(manifests, "ConfigMap")["multimodal-settings"]["data"]
        self.ports = {name: free_port() for name in self.deployments}
        self.processes: dict[str, Process] = {}
        self.tmp, self.model_store = tmp, model_store

    def container(self, name: str) -> dict:
        return self.deployments[name]["spec"]["template"]["spec"]["containers"][0]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        container = self.container(name)
        volumes = self.tmp / name
        env = {**os.environ, **self.settings, **{item["name"]: item["value"] for item in container["env"]}}
        for variable in ("BENTOML_HOME", "HOME", "XDG_CACHE_HOME"):
            env[variable] = str(volumes / env[variable].strip("/"))
            Path(env[variable]).mkdir(parents=True, exist_ok=True)
        (Path(env["BENTOML_HOME"]) / "models").symlink_to(self.model_store, target_is_directory=True)
        env |= {
            "BENTOML_CONFIG": str(REPO / "configuration" / "bentoml.yaml"),  # the image's environment sets it
            "MULTIMODAL_LLAVA_ENGINE_PORT": str(free_port()),
        }
        args = _local_args(container["args"], self.ports[name], self.ports)
        cmd = [sys.executable, "-m", "bentoml_cli._internal.start", *args, BENTO]
        self.processes[name] = start(cmd, volumes / "serve.log", env)

    def wait_for_probe(self, name: str, probe: str) -> None:
        path = self.container(name)[probe]["httpGet"]["path"]
        check = lambda: httpx.get(self.url(name) + path, timeout=5).status_code == 200  # noqa: E731
        wait_until(check, self.processes[name], f"{name} {probe} {path}", timeout=300)

    def stop(self) -> dict[str, float]:
        """SIGTERM each service, as the kubelet does after preStop; returns seconds to exit."""
        took = {}
        for name, process in self.processes.items():
            started = time.monotonic()
            process.stop()
            took[name] = time.monotonic() - started
        return took


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[SplitProduct]:
    product = SplitProduct(tmp_path_factory.mktemp("split"), model_store)
    try:
        for name in product.deployments:
            product.start(name)
        for name in product.deployments:
            product.wait_for_probe(name, "startupProbe")
        yield product
    finally:
        product.stop()


def test_probes_the_manifests_point_at_answer(split: SplitProduct):
    for name in split.deployments:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = split.container(name)[probe]["httpGet"]["path"]
            assert httpx.get(split.url(name) + path, timeout=10).status_code == 200, (name, probe, path)


def test_every_family_answers_through_the_entry_service_and_each_pod_exports_its_series(split: SplitProduct):
    gateway = split.url("gateway")
    image = png_bytes(random_image(7))
    search = httpx.post(f"{gateway}/search", json={"image_data": b64(image), "texts": ["a cat", "a dog"]}, timeout=120)
    assert search.status_code == 200, search.text
    chat = httpx.post(
        f"{gateway}/v1/chat/completions",
        json=chat_body(data_url(image), "Hi"),
        timeout=300,
    )
    assert chat.status_code == 200, chat.text
    speech = httpx.post(
        f"{gateway}/v1/audio/transcriptions",
        files={"file": ("a.wav", wav_bytes(), "audio/wav")},
        data={"model": "whisper"},
        timeout=300,
    )
    assert speech.status_code == 200, speech.text

    scrape = {name: httpx.get(split.url(name) + "/metrics", timeout=10).text for name in split.deployments}
    # The autoscaling signal lives on the entry pods, per model (deploy/autoscaling.py).
    for model in ("clip", "llava", "whisper"):
        assert f'queue_depth{{model="{model}"}}' in scrape["gateway"]
        assert "queue_depth{" not in scrape[model]
    assert "clip_requests_total{" in scrape["gateway"] and "clip_embedding_duration_seconds_bucket{" in scrape["clip"]
    assert "vllm:kv_cache_usage_perc{" in scrape["llava"]
    assert "whisper_batch_size_bucket{" in scrape["whisper"]


def test_services_stop_within_the_termination_grace_period(split: SplitProduct):
    took = split.stop()
    for name, seconds in took.items():
        grace = split.deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert seconds < grace, (name, seconds)
        assert split.processes[name].popen.returncode != -signal.SIGKILL, f"{name} had to be killed"
