"""LLaVA model service: vLLM's own OpenAI-compatible server, started and watched by BentoML.

Why vLLM's server as a subprocess (BentoML's ``__command__`` and its reverse proxy) rather
than vLLM's async engine inside this process:

- vLLM's command line and HTTP API are its stable surface; its Python internals (engine
  client, serving classes, ``init_app_state``) change shape between minor versions, which is
  why BentoML's own vLLM examples moved to this design.
- Continuous batching, the OpenAI protocol (streaming, ``n``, ``seed``, ``stop``, usage),
  LLaVA's chat template and the engine's metrics come exactly as vLLM ships them.
- An engine crash cannot leave a BentoML worker serving nothing: ``__is_alive__`` and
  ``__is_ready__`` report it at once (the gateway answers 503 and reports LLaVA not ready), and
  the worker then exits, so that it is started again with a new engine: by ``bentoml serve``
  (its process supervisor respawns dead workers outside containers), or by Kubernetes, whose
  liveness probe finds the worker gone (BentoML turns respawning off inside containers).

vLLM listens on loopback only. BentoML proxies every route it does not own itself
(``/v1/chat/completions``, ``/v1/models``, ``/health``) to it, and the entry service reaches
those through this service's socket after checking every image itself: vLLM only ever
receives ``data:`` URLs. vLLM inherits BentoML's ``PROMETHEUS_MULTIPROC_DIR``, so its
``vllm:*`` metrics appear on the product's ``/metrics`` beside ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import sys
from typing import Any

import bentoml
import httpx

from configuration.profiles import model_spec
from configuration.settings import get_settings
from services.common.device import uses_gpu
from services.common.model_service import as_service, model_service

log = logging.getLogger(__name__)
settings = get_settings()


@model_service(
    "LLaVA",
    http={"proxy_port": settings.llava_engine_port},
    endpoints={"livez": "/health"},  # polled until vLLM answers, before the service counts as started
)
class LLaVA:
    model_ref = bentoml.models.BentoModel(model_spec("llava").tag)

    def __command__(self) -> list[str]:
        command = [
            sys.executable, "-m", "services.llava.service",  # becomes vLLM's server: see the end of this file
            "--model", self.model_ref.path,
            "--served-model-name", self.model_ref.tag.name,
            "--host", "127.0.0.1",
            "--port", str(settings.llava_engine_port),
            "--dtype", settings.llava_dtype,
            "--max-model-len", str(settings.llava_max_model_len),
            "--max-num-seqs", str(settings.llava_max_num_seqs),
            "--limit-mm-per-prompt", json.dumps({"image": settings.llava_max_images_per_request}),
            "--disable-uvicorn-access-log",
            "--disable-fastapi-docs",
        ]  # fmt: skip
        # The gateway checks every image first; vLLM's own per-image cap (VLLM_MAX_IMAGE_PIXELS,
        # 179 MP by default, no per-request sum) is lowered to ours in case anything else reaches it.
        os.environ.setdefault("VLLM_MAX_IMAGE_PIXELS", str(settings.max_image_pixels))
        if uses_gpu():
            command += ["--gpu-memory-utilization", str(settings.llava_gpu_memory_utilization)]
        else:
            # vLLM on the CPU takes its KV cache from host memory; CUDA graphs do not apply.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.llava_cpu_kv_cache_gib))
            command += ["--enforce-eager"]
        return command + shlex.split(settings.llava_engine_args)

    def _engine_running(self) -> bool:
        process = _state().get("proc")
        return process is not None and process.returncode is None

    async def _engine_healthy(self) -> bool:
        client: httpx.AsyncClient | None = _state().get("client")
        if client is None or not self._engine_running():
            return False
        try:
            return (await client.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False

    async def __is_alive__(self) -> bool:
        return self._engine_running()

    @bentoml.on_startup
    async def watch_engine(self) -> None:
        # A task of its own: startup hooks run before BentoML's proxy starts the engine.
        self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_engine_dies())

    async def _exit_when_engine_dies(self) -> None:
        while (process := _state().get("proc")) is None:
            await asyncio.sleep(1)
        code = await process.wait()
        if code == -signal.SIGTERM:  # BentoML's proxy stopping it at shutdown (or an operator's orderly stop)
            return
        log.error("the vLLM engine exited with %s; ending this worker so that it starts again with a new engine", code)
        logging.shutdown()
        os._exit(ENGINE_DIED_EXIT_CODE)  # not sys.exit: uvicorn would wait to drain requests that cannot finish

    async def __is_ready__(self) -> bool:
        return await self._engine_healthy()


def _state() -> dict[str, Any]:
    """This process's BentoML service state, where BentoML's proxy keeps vLLM's process ("proc") and
    its HTTP client to it ("client")."""
    return as_service(LLaVA).context.state


ENGINE_DIED_EXIT_CODE = 3
PR_SET_PDEATHSIG = 1

if __name__ == "__main__":
    # Started by __command__: ask the kernel to send SIGTERM if the BentoML worker that started
    # this process dies, however it dies, then become vLLM's server. Without it a killed worker
    # leaves vLLM running, holding the accelerator's memory and its port, and the next start fails.
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.execv(sys.executable, [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *sys.argv[1:]])
