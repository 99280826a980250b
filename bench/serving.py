"""``bentoml serve`` of the product on this machine, for the benchmarks: start, wait until ready, stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServedProduct:
    """``bentoml serve services.gateway:Gateway`` on 127.0.0.1:``port`` with ``env`` over this
    process's environment and the project's BentoML configuration; its output goes to ``log``."""

    def __init__(self, port: int, log: Path, **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        environment = {
            **os.environ,
            "BENTOML_CONFIG": str(REPO / "configuration" / "bentoml.yaml"),
            "BENTOML_DO_NOT_TRACK": "true",
            **env,
        }
        command = [sys.executable, "-m", "bentoml", "serve", "services.gateway:Gateway"]
        command += ["--port", str(port), "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 60) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def workers(self, service: str) -> list[Any]:
        """The worker processes of one service (``--service-name``), as psutil processes."""
        import psutil

        root = psutil.Process(self.process.pid)
        found = []
        for child in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                if f"--service-name {service}" in " ".join(child.cmdline()):
                    found.append(child)
        return found


def py_spy(pid: int, out: Path, seconds: float, rate: int = 200) -> None:
    """Start py-spy on ``pid`` for ``seconds`` in the background: every thread's samples in ``out``,
    and only the GIL holder's in ``pyspy-gil-...`` beside it (where the process's Python time goes)."""
    command = shutil.which("py-spy") or str(Path(sys.prefix) / "bin" / "py-spy")
    for path in map(Path, os.environ.get("PYTHONPATH", "").split(os.pathsep)):  # the device's wheels
        if (path / "bin" / "py-spy").exists():
            command = str(path / "bin" / "py-spy")
    record = [command, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
              "--nonblocking", "--format", "raw", "--threads", "--output", str(out)]  # fmt: skip
    subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gil = [*record[:-1], str(out.with_name(out.name.replace("pyspy-", "pyspy-gil-", 1))), "--gil"]
    subprocess.Popen(gil, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
