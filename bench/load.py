"""Closed-loop HTTP load from several processes, bounded in time, to a server on this machine.

Each of ``concurrency`` clients sends one request, waits for the answer and sends the next,
for ``warmup + duration`` seconds; only answers to requests sent after the warm-up count.
The clients are spread over processes (one asyncio loop and aiohttp session each), so that
the load generator is not the wall when the server answers thousands of requests a second.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit


@dataclass
class LevelResult:
    concurrency: int
    requests: int  # answered within the measured window
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    retry_after_missing: int = 0  # 429/503 answers without a Retry-After header
    errors: list[str] = field(default_factory=list)  # a few bodies of answers other than 200

    def as_dict(self) -> dict:
        return asdict(self)


async def _clients(
    url: str, bodies: list[bytes], clients: int, offset: int, start: float, measure_from: float, stop: float
):
    import aiohttp

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    missing_retry_after = 0
    errors: list[str] = []  # the first few answers other than 200, to say what went wrong
    headers = {"content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def client(index: int) -> None:
            nonlocal missing_retry_after
            i = index
            while (sent := time.time()) < stop:
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as response:
                        answer = await response.read()
                        status = str(response.status)
                        if response.status != 200 and len(errors) < 3:
                            errors.append(f"{status} {answer[:300].decode(errors='replace')}")
                        no_retry_after = response.status in (429, 503) and "Retry-After" not in response.headers
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status, no_retry_after = type(exc).__name__, False
                if sent >= measure_from:
                    latencies.append(time.time() - sent)
                    statuses[status] += 1
                    missing_retry_after += no_retry_after
                i += clients * 64  # another body next time, different from the other clients'

        while time.time() < start:
            await asyncio.sleep(0.001)
        await asyncio.gather(*(client(offset + k) for k in range(clients)))
    return latencies, dict(statuses), missing_retry_after, errors


def _process(args: tuple) -> tuple[list[float], dict[str, int], int, list[str]]:
    return asyncio.run(_clients(*args))


def run_level(
    url: str, bodies: list[bytes], concurrency: int, *, duration: float, warmup: float, processes: int
) -> LevelResult:
    """``url`` must be on this machine (loopback): this is a load test."""
    assert urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"), "load only loopback servers"
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (p < concurrency % processes) for p in range(processes)]
    start = time.time() + 1.0  # every process starts its clients together
    measure_from, stop = start + warmup, start + warmup + duration
    offsets = [sum(shares[:p]) for p in range(processes)]
    jobs = [(url, bodies, shares[p], offsets[p], start, measure_from, stop) for p in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.map(_process, jobs)
    latencies = sorted(x for part in parts for x in part[0])
    statuses: Counter[str] = Counter()
    for part in parts:
        statuses.update(part[1])
    return LevelResult(
        concurrency=concurrency,
        requests=len(latencies),
        seconds=duration,
        per_second=len(latencies) / duration,
        p50_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        statuses=dict(statuses),
        retry_after_missing=sum(part[2] for part in parts),
        errors=[error for part in parts for error in part[3]][:5],
    )
