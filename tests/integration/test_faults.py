"""Faults, tested on a real ``bentoml serve`` (CLIP and Whisper) and a real ``redis-server``.

One server serves every test here, in file order, under a small asyncio/httpx load (bounded in
count and time): Redis killed and restarted, a model worker killed, then SIGTERM to the server
itself, which ends it (so that test runs last). The vLLM engine's death is tested beside the
other LLaVA tests (tests/integration/test_llava_api.py), on the server that already runs vLLM.
Bounds below are test timeouts, not speed claims.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import soundfile

from tests.conftest import Process, Server, free_port, launch_product, start, wait_until
from tests.helpers import metric_value

pytestmark = pytest.mark.integration

# A dead worker is respawned and reloads its model; on this busy 2-core machine that took
# 10-25 s for the tiny models: 90 s leaves room without letting a stuck restart pass.
RECOVERY_SECONDS = 90
# Per-request client timeout: anything slower counts as a hang.
HANG_SECONDS = 30


class RestartableRedis:
    """A real redis-server on a fixed port, so that a restart comes back at the same URL."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed; `make test` installs it")
        self.executable, self.directory, self.port = executable, directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Process | None = None

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        cmd = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = start([*cmd, "--dir", str(self.directory)], self.directory / f"redis-{time.monotonic_ns()}.log")
        wait_until(lambda: self.client().ping(), self.process, "redis-server", timeout=30)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableRedis]:
    redis = RestartableRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    yield redis
    if redis.process is not None:
        redis.process.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path, redis: RestartableRedis) -> Iterator[Server]:
    """CLIP and Whisper (no vLLM: it has its own fault test) with the Redis cache."""
    server = launch_product(
        tmp_path_factory.mktemp("bentoml-home"),
        model_store,
        MULTIMODAL_FAMILIES="clip,whisper",
        MULTIMODAL_REDIS_URL=redis.url,
        MULTIMODAL_REDIS_RETRY_AFTER_SECONDS="1",  # come back to Redis soon after it returns
    )
    yield server
    server.process.stop()


# Load: a few concurrent clients, each sending requests one after another until told to stop


@dataclass
class Outcome:
    started: float  # time.monotonic()
    status: int | None  # None: no HTTP answer
    retry_after: str | None = None
    error: str | None = None  # the exception's name when there was no answer


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


def unique_texts_request(url: str) -> Request:
    """Embeddings of texts never seen before: every request misses the cache and stores into it."""
    run = uuid.uuid4().hex[:8]

    async def send(client: httpx.AsyncClient, n: int) -> httpx.Response:
        texts = [f"fault run {run} request {n} text {i}" for i in range(4)]
        return await client.post(
            f"{url}/v1/embeddings", json={"model": "clip", "input": texts, "encoding_format": "float"}
        )

    return send


def wav(seconds: float, seed: int = 0) -> bytes:
    samples = (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def transcription_request(url: str, audio: bytes, language: str | None = "en") -> Request:
    async def send(client: httpx.AsyncClient, n: int) -> httpx.Response:
        files = {"file": ("a.wav", audio, "audio/wav")}
        data = {"model": "whisper-1", **({"language": language} if language else {})}
        return await client.post(f"{url}/v1/audio/transcriptions", files=files, data=data)

    return send


async def run_load(
    request: Request,
    *,
    clients: int,
    seconds: float,
    max_requests: int,
    during: Callable[[], Awaitable[None]] | None = None,
) -> list[Outcome]:
    """``clients`` loops sending ``request`` until ``seconds`` pass or ``max_requests`` are sent; ``during`` runs
    meanwhile."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(max_requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for n in counter:
            if time.monotonic() > deadline:
                return
            started = time.monotonic()
            try:
                response = await request(client, n)
                outcomes.append(Outcome(started, response.status_code, response.headers.get("retry-after")))
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(started, None, error=type(exc).__name__))

    async with httpx.AsyncClient(timeout=HANG_SECONDS) as client:
        loops = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        if during is not None:
            await during()
        await asyncio.gather(*loops)
    return outcomes


def statuses(outcomes: list[Outcome]) -> Counter:
    return Counter(outcome.status or outcome.error for outcome in outcomes)


def worker_pids(server: Server, service: str) -> list[int]:
    """The model service's worker processes, found by their command line (``--service-name CLIP``)."""
    children = psutil.Process(server.process.popen.pid).children(recursive=True)
    pids = []
    for child in children:
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "--service-name" in command and command[command.index("--service-name") + 1] == service:
            pids.append(child.pid)
    return pids


def ready(server: Server, *families: str) -> httpx.Response:
    return httpx.get(f"{server.url}/ready", params=[("family", name) for name in families], timeout=10)


# /ready per family


def test_ready_reports_every_family_and_each_alone(server):
    everything = ready(server)
    assert everything.status_code == 200
    assert everything.json() == {"status": "ready", "families": {"clip": True, "whisper": True}}
    assert ready(server, "clip").json() == {"status": "ready", "families": {"clip": True}}
    not_served = ready(server, "llava")
    assert not_served.status_code == 404 and not_served.json()["error"]["code"] == "not_served"
    invalid = ready(server, "dall-e")
    assert invalid.status_code == 400 and invalid.json()["error"]["param"].startswith("family")


# Redis killed and restarted during load


def test_redis_killed_and_restarted_during_load_fails_no_request(server, redis):
    errors_before = metric_value(server.metrics(), "clip_cache_errors_total", backend="redis")

    async def kill_then_restart() -> None:
        await asyncio.sleep(2)
        redis.kill()  # SIGKILL: no goodbye to the clients
        await asyncio.sleep(3)
        await asyncio.to_thread(redis.start)  # an empty Redis, same port

    outcomes = asyncio.run(
        run_load(unique_texts_request(server.url), clients=4, seconds=12, max_requests=2000, during=kill_then_restart)
    )
    assert statuses(outcomes) == {200: len(outcomes)}, statuses(outcomes)
    assert len(outcomes) > 20
    print(f"Redis killed and restarted: {len(outcomes)} requests, {dict(statuses(outcomes))}")
    # Redis was really missed, and the cache came back to the new server (it was empty at start).
    assert metric_value(server.metrics(), "clip_cache_errors_total", backend="redis") > errors_before
    assert redis.client().dbsize() > 0


# A model worker killed during load


@pytest.mark.parametrize("service", ["CLIP", "Whisper"])
def test_a_killed_model_worker_is_503_with_retry_after_then_recovers(server, service):
    family = service.lower()
    request = unique_texts_request(server.url) if service == "CLIP" else transcription_request(server.url, wav(2))
    [pid] = worker_pids(server, service)
    killed_at: list[float] = []
    readiness_during_outage: list[httpx.Response] = []

    async def kill() -> None:
        await asyncio.sleep(2)
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        readiness_during_outage.append(await asyncio.to_thread(ready, server))

    outcomes = asyncio.run(run_load(request, clients=4, seconds=15, max_requests=1000, during=kill))
    counts = statuses(outcomes)
    # Every request is answered: 200, or 503 with Retry-After; never a 500, a 504 or a hang.
    assert set(counts) <= {200, 503}, counts
    assert all(o.retry_after == "1" for o in outcomes if o.status == 503)
    assert counts[200] > 0

    # /ready names the dead family and only it.
    outage = readiness_during_outage[0]
    assert outage.status_code == 503, outage.text
    assert outage.json()["families"] == {"clip": family != "clip", "whisper": family != "whisper"}
    assert outage.headers["retry-after"] == "1"

    # BentoML's supervisor (circus) respawns the worker; the family answers again within the bound.
    deadline = killed_at[0] + RECOVERY_SECONDS
    while ready(server, family).status_code != 200:
        assert time.monotonic() < deadline, (
            f"{service} not back within {RECOVERY_SECONDS} s:\n{server.process.log_tail()}"
        )
        time.sleep(1)
    print(f"{service}: {dict(counts)}; ready again {time.monotonic() - killed_at[0]:.1f} s after the kill")
    assert worker_pids(server, service) not in ([], [pid])
    after = asyncio.run(run_load(request, clients=2, seconds=10, max_requests=6))
    assert statuses(after) == {200: len(after)}


# Graceful shutdown (ends the server: last)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(server):
    # 90 s of audio in three chunks, language detected first: several calls to the Whisper service
    # each, over seconds, so the requests are in flight (checked below) when the signal comes.
    request = transcription_request(server.url, wav(90, seed=1), language=None)

    async def scenario() -> tuple[list[httpx.Response | BaseException], Outcome, float]:
        async with httpx.AsyncClient(timeout=120) as client:
            in_flight = [asyncio.create_task(request(client, n)) for n in range(3)]
            await asyncio.sleep(1.5)  # sent and accepted
            done = [task.result().status_code for task in in_flight if task.done()]
            assert not done, f"requests finished before the signal: {done}"
            signalled = time.monotonic()
            server.process.popen.send_signal(signal.SIGTERM)  # `bentoml serve` itself, as Kubernetes would
            await asyncio.sleep(1)
            try:  # a new client, as a new caller would come: a new connection
                async with httpx.AsyncClient(timeout=10) as late_client:
                    late = await late_client.post(f"{server.url}/search", json={"image_data": "x", "texts": ["a"]})
                refused = Outcome(time.monotonic(), late.status_code, late.headers.get("retry-after"))
            except httpx.HTTPError as exc:
                refused = Outcome(time.monotonic(), None, error=type(exc).__name__)
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            return results, refused, signalled

    results, refused, signalled = asyncio.run(scenario())
    assert [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results] == [200] * 3
    # Refused: no connection, or one closed without an answer (the arbiter still holds the listening
    # socket, so the kernel completes the handshake, then resets it), or a 503; never a timeout.
    assert refused.error in ("ConnectError", "ReadError", "RemoteProtocolError") or (
        refused.status == 503 and refused.retry_after
    ), refused
    try:
        server.process.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bentoml serve still running 60 s after SIGTERM:\n{server.process.log_tail()}")
    print(
        f"late request: {refused}; exited {time.monotonic() - signalled:.1f} s after SIGTERM, "
        f"code {server.process.popen.returncode}"
    )
