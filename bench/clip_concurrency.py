"""How adaptive batching pays off: CLIP image embeddings at rising concurrency, one server.

    python -m bench.clip_concurrency                      # starts the product (CLIP only) itself
    python -m bench.clip_concurrency --url http://host:3000 --requests 512

For each concurrency level it sends the same number of /v1/embeddings requests (one image
each, distinct images so the cache never answers), and records throughput, latency
percentiles and the mean CLIP batch size read from the server's own metrics. Results go to
``bench/results/clip_concurrency.json`` and a plot beside it. On a CPU with the tiny model
only ratios between levels mean anything; absolute figures need a GPU and real weights.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def image_payloads(count: int, size: tuple[int, int]) -> list[dict]:
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        payloads.append({"model": "clip", "input": [url]})
    return payloads


def batch_totals(metrics_text: str) -> tuple[float, float]:
    """(items, batches) of the image encoder so far."""
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.labels.get("kind") == "image" and sample.name in ("clip_batch_size_sum", "clip_batch_size_count")
    }
    return values.get("clip_batch_size_sum", 0.0), values.get("clip_batch_size_count", 0.0)


async def run_level(client: httpx.AsyncClient, payloads: list[dict], concurrency: int, progress: tqdm) -> dict:
    before = batch_totals((await client.get("/metrics")).text)
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(payload: dict) -> None:
        async with semaphore:
            started = time.perf_counter()
            response = await client.post("/v1/embeddings", json=payload)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            progress.update()

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in payloads))
    elapsed = time.perf_counter() - started
    after = batch_totals((await client.get("/metrics")).text)
    items, batches = after[0] - before[0], after[1] - before[1]
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(payloads),
        "throughput_per_s": len(payloads) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "mean_batch_size": items / batches if batches else 0.0,
    }


def start_server(port: int) -> tuple[subprocess.Popen, Path]:
    home = Path(tempfile.mkdtemp(prefix="bench-bentoml-"))
    import bentoml

    (home / "models").symlink_to(Path(bentoml.models.get("tiny-clip").path).parents[1])
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_CONFIG": str(REPO / "configuration" / "bentoml.yaml"),
        "MULTIMODAL_FAMILIES": "clip",
        "MULTIMODAL_CACHE_BACKEND": "none",
    }
    command = [str(Path(sys.executable).parent / "bentoml"), "serve", "services.gateway:Gateway", "--port", str(port)]
    log = home / "serve.log"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process, log
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    process.terminate()
    raise RuntimeError("server not ready in 10 minutes")


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in results]
    base = results[0]["throughput_per_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [r["throughput_per_s"] / base for r in results], marker="o", label="throughput / concurrency 1")
    left.plot(levels, [r["mean_batch_size"] for r in results], marker="s", label="mean CLIP batch size")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent requests")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(levels, [r["p50_ms"] / results[0]["p50_ms"] for r in results], marker="o", label="p50 latency")
    right.plot(levels, [r["p95_ms"] / results[0]["p50_ms"] for r in results], marker="^", label="p95 latency")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent requests")
    right.set_ylabel("x p50 at concurrency 1")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace) -> list[dict]:
    payloads = image_payloads(args.requests * len(args.concurrency), (640, 480))
    results = []
    async with httpx.AsyncClient(base_url=args.url, timeout=300, limits=httpx.Limits(max_connections=256)) as client:
        await client.post("/v1/embeddings", json=payloads[0])  # warm-up: batcher's first fits
        with tqdm(total=len(payloads), desc="requests", unit="req") as progress:
            for i, level in enumerate(args.concurrency):
                chunk = payloads[i * args.requests : (i + 1) * args.requests]
                results.append(await run_level(client, chunk, level, progress))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; by default one is started (tiny CLIP, no cache)")
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--name", default="clip_concurrency")
    args = parser.parse_args()

    process = None
    if args.url is None:
        port = 3790
        process, _ = start_server(port)
        args.url = f"http://127.0.0.1:{port}"
    try:
        results = asyncio.run(main_async(args))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": args.name, "machine": machine, "url": args.url, "results": results}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, RESULTS / f"{args.name}.png", f"CLIP image embeddings, one server ({machine})")
    for r in results:
        print(
            f"concurrency {r['concurrency']:>3}: "
            f"{r['throughput_per_s'] / results[0]['throughput_per_s']:5.2f}x throughput, "
            f"mean batch {r['mean_batch_size']:5.1f}, p50 {r['p50_ms'] / results[0]['p50_ms']:5.2f}x"
        )


if __name__ == "__main__":
    main()
