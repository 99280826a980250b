"""Fixtures that start real servers: ``bentoml serve`` of the product and ``redis-server``.

Each server gets its own BENTOML_HOME (BentoML wipes ``$BENTOML_HOME/prometheus_multiproc_dir``
when it starts, so two servers sharing one would clobber each other's metrics) whose
``models`` folder links to the real model store filled by ``python -m bentos.import_models``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Generous: a vLLM engine on a busy 2-core machine can take minutes to start.
READY_TIMEOUT_SECONDS = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    popen: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up, as in a crash."""
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=30)
        # Whatever the group left behind (a vLLM engine core orphaned by a test that killed its
        # server holds gigabytes) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
    handle = log.open("wb")
    popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return Process(popen, log)


def wait_until(check: Callable[[], bool], process: Process, what: str, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            pytest.fail(f"{what} exited with {process.popen.returncode}:\n{process.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    process.stop()
    pytest.fail(f"{what} not ready after {timeout} s:\n{process.log_tail()}")


@dataclass
class Server:
    url: str
    process: Process
    env: dict[str, str]

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@pytest.fixture(scope="session")
def model_store() -> Path:
    """The real model store; the README's test command imports the tiny models first."""
    return Path(bentoml.models.get("tiny-clip").path).parents[1]


def launch_product(home: Path, model_store: Path, **env_overrides: str) -> Server:
    """``bentoml serve services.gateway:Gateway`` with its own BENTOML_HOME, waited for until ``/ready``."""
    (home / "models").symlink_to(model_store, target_is_directory=True)
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_CONFIG": str(REPO / "configuration" / "bentoml.yaml"),
        "BENTOML_DO_NOT_TRACK": "true",
        # Servers may run side by side: each vLLM gets its own loopback port.
        "MULTIMODAL_LLAVA_ENGINE_PORT": str(free_port()),
        **env_overrides,
    }
    cmd = [str(BIN / "bentoml"), "serve", "services.gateway:Gateway", "--port", str(port), "--host", "127.0.0.1"]
    process = start(cmd, home / "serve.log", env)
    server = Server(f"http://127.0.0.1:{port}", process, env)
    wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code == 200, process, "bentoml serve")
    return server


@pytest.fixture(scope="module")
def serve_product(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[Callable[..., Server]]:
    """Start ``bentoml serve services.gateway:Gateway`` with extra environment.

    Its servers stop when the test module ends: a CI machine (2 cores, 24 GB) cannot hold every
    module's servers at once (each vLLM engine alone takes about 2 GB)."""
    servers: list[Server] = []

    def serve(**env_overrides: str) -> Server:
        server = launch_product(tmp_path_factory.mktemp("bentoml-home"), model_store, **env_overrides)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.process.stop()


@dataclass
class Redis:
    url: str
    port: int
    process: Process

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """A real, throwaway redis-server on a free port (no persistence)."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed; `make test` installs it")
    port = free_port()
    cmd = [
        executable,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
    ]
    process = start(cmd, tmp_path / "redis.log")
    redis = Redis(f"redis://127.0.0.1:{port}/0", port, process)
    wait_until(lambda: redis.client().ping(), process, "redis-server", timeout=30)
    yield redis
    process.stop()


# Caps small enough that the bad-input corpus reaches each limit with a small body, and a small
# max_tokens so that every generation the fuzzer manages to make valid ends quickly on the CPU.
HARDENED_LIMITS = {
    "MULTIMODAL_MAX_REQUEST_BYTES": str(4 * 2**20),
    "MULTIMODAL_MAX_IMAGE_BYTES": str(2**20),
    "MULTIMODAL_MAX_AUDIO_BYTES": str(2 * 2**20),
    "MULTIMODAL_MAX_AUDIO_SECONDS": "60",
    "MULTIMODAL_LLAVA_MAX_TOKENS": "16",
    "MULTIMODAL_LLAVA_MAX_MODEL_LEN": "512",
}


@pytest.fixture(scope="session")
def hardened_product(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[Server]:
    """Every family (real vLLM included) with ``HARDENED_LIMITS``: shared by the fuzz and corpus tests."""
    server = launch_product(tmp_path_factory.mktemp("bentoml-home"), model_store, **HARDENED_LIMITS)
    yield server
    server.process.stop()
