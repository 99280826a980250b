"""The image library's numbers: the stores themselves, and text-to-image search end to end.

    python -m bench.library store --vectors 1000000 --milvus-vectors 200000      # here, on the CPU
    python -m bench.library served --vectors 1000000                               # on the GPU machine

``store`` (a benchmark, not a test): synthetic unit vectors of 768 dimensions (ViT-L/14's),
generated here in seeded chunks, added to each store in batches (vectors/s), then searched at 1,
16 and 64 concurrent clients for a fixed time (p50, p99, queries/s), each client a coroutine
going through the product's own ``Coalescer`` (concurrent searches merged into one store call,
as the entry service does). Queries are stored vectors with noise added, normalised. Recall@10
of each store against exact float32 search over the same vectors (numpy, in chunks).

``served`` (for the GPU machine): ``bentoml serve`` of the product with a random-weight ViT-L/14
(the production shape), the embedded store. First images added end to end through HTTP (photographs
from scikit-image, batches of 32: images/s); then ``--vectors`` synthetic vectors loaded into that
collection's files directly (the server follows them, as it follows any writer); then closed-loop
text-to-image search through ``POST /v1/library/{collection}/search`` at 1/16/64/256 clients, every
request a distinct text (the embedding cache off: each query is embedded), and vector search beside
it. Results: JSON and a PNG plot in --out (bench/figures/ for the checked-in runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.load import run_level
from services.common.coalescing import Coalescer
from services.library.api import QUERIES_PER_SEARCH
from services.library.store import CollectionModel, LibraryStore

REPO = Path(__file__).resolve().parents[1]
DIMENSIONS = 768
CHUNK = 10_000  # vectors per generated chunk and per add
COLLECTION = "bench"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# Synthetic vectors: chunk c is always the same, so the ground truth can be regenerated instead of kept.


def chunk_vectors(index: int, count: int = CHUNK, dimensions: int = DIMENSIONS, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng([seed, index]).standard_normal((count, dimensions), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def chunks(total: int, dimensions: int = DIMENSIONS) -> Iterator[tuple[int, np.ndarray]]:
    for index, start in enumerate(range(0, total, CHUNK)):
        yield start, chunk_vectors(index, min(CHUNK, total - start), dimensions)


def make_queries(total: int, count: int, dimensions: int = DIMENSIONS, seed: int = 1) -> np.ndarray:
    """Near stored vectors (a stored vector plus as much noise again), as a query for a known image is."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, total, count)
    chunk_of: dict[int, np.ndarray] = {}
    for c in {int(p) // CHUNK for p in picks}:  # each chunk generated once
        chunk_of[c] = chunk_vectors(c, min(CHUNK, total - c * CHUNK), dimensions)
    base = np.stack([chunk_of[int(p) // CHUNK][int(p) % CHUNK] for p in picks])
    noisy = base + rng.standard_normal(base.shape, dtype=np.float32) / np.sqrt(dimensions)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def exact_top(total: int, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of each query's k nearest vectors, float32, brute force over regenerated chunks."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), k), dtype=np.int64)
    for start, vectors in tqdm(chunks(total), total=-(-total // CHUNK), desc="exact search", unit="chunk"):
        scores = queries @ vectors.T
        ids = np.broadcast_to(np.arange(start, start + len(vectors)), scores.shape)
        merged_scores = np.hstack([best_scores, scores])
        merged_ids = np.hstack([best_ids, ids])
        top = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_ids = np.take_along_axis(merged_ids, top, axis=1)
    return best_ids


# The stores


def open_store(kind: str, path: Path, search_device: str) -> LibraryStore:
    if kind == "milvus":
        from services.library.milvus import MilvusStore

        return MilvusStore(str(path / "milvus.db"))
    from services.library.embedded import EmbeddedStore

    return EmbeddedStore(path, device=search_device)


def fill(store: LibraryStore, total: int) -> dict[str, float]:
    store.ensure(COLLECTION, CollectionModel("synthetic", 0, DIMENSIONS))
    started = time.perf_counter()
    with tqdm(total=total, desc="add", unit="vec", unit_scale=True) as progress:
        for start, vectors in chunks(total):
            ids = [f"v{i}" for i in range(start, start + len(vectors))]
            store.upsert(COLLECTION, ids, vectors, [{"shard": i % 16} for i in range(start, start + len(vectors))])
            progress.update(len(vectors))
    seconds = time.perf_counter() - started
    return {"vectors": total, "seconds": seconds, "vectors_per_s": total / seconds}


async def _level(store: LibraryStore, queries: np.ndarray, clients: int, duration: float, warmup: float) -> dict:
    latencies: list[float] = []
    batch_sizes: list[int] = []  # how many queries each store call carried

    async def search(q: list[np.ndarray]) -> list[Any]:
        batch_sizes.append(len(q))
        return await asyncio.to_thread(store.search, COLLECTION, np.stack(q), 10, None)

    batcher: Coalescer[np.ndarray, Any] = Coalescer(search, max_items=QUERIES_PER_SEARCH, max_in_flight=1)
    start = time.perf_counter()
    measure_from, stop = start + warmup, start + warmup + duration

    async def client(i: int) -> None:
        while (sent := time.perf_counter()) < stop:
            await batcher.each([queries[i % len(queries)]])
            if sent >= measure_from:
                latencies.append(time.perf_counter() - sent)
            i += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.sort()
    return {
        "clients": clients,
        "queries": len(latencies),
        "qps": len(latencies) / duration,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "mean_queries_per_store_call": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
    }


def recall_at_10(store: LibraryStore, queries: np.ndarray, truth: np.ndarray) -> float:
    found = store.search(COLLECTION, queries, 10, None)
    hits = [len({int(h.id[1:]) for h in row} & set(truth[i].tolist())) for i, row in enumerate(found)]
    return float(np.sum(hits) / truth.size)


def bench_store(
    kind: str, total: int, levels: list[int], duration: float, warmup: float, keep: Path | None, search_device: str
) -> dict:
    path = keep or Path(tempfile.mkdtemp(prefix=f"bench-library-{kind}-"))
    log(f"{kind}: {total:,} vectors of {DIMENSIONS} dimensions in {path}")
    store = open_store(kind, path, search_device)
    result: dict[str, Any] = {"store": kind, "vectors": total, "add": fill(store, total)}
    log(f"{kind}: added {result['add']['vectors_per_s']:,.0f} vectors/s")
    if kind == "milvus":
        # milvus-lite searches freshly added data slowly (1.2 s for 20k vectors; 2 s for 60k even once
        # flushed) until the collection is loaded again with its segments sealed and indexed (94 ms for
        # 60k): flush and reload, the state a library is in after a restart.
        from services.library.milvus import PREFIX

        started = time.perf_counter()
        client = store.client  # type: ignore[attr-defined]
        client.flush(PREFIX + COLLECTION)
        client.release_collection(PREFIX + COLLECTION)
        client.load_collection(PREFIX + COLLECTION)
        result["flush_and_reload_seconds"] = time.perf_counter() - started
        log(f"milvus: flushed and reloaded in {result['flush_and_reload_seconds']:.1f} s")
    queries = make_queries(total, 512)
    store.search(COLLECTION, queries[:1], 10, None)  # first search: maps the file (copies it to the GPU there)
    truth = exact_top(total, queries[:100], 10)
    result["recall_at_10"] = recall_at_10(store, queries[:100], truth)
    log(f"{kind}: recall@10 against exact float32 search {result['recall_at_10']:.4f}")
    result["levels"] = []
    for clients in levels:
        level = asyncio.run(_level(store, queries, clients, duration, warmup))
        latency = f"p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms"
        log(f"{kind}: {clients} clients: {level['qps']:,.1f} q/s, {latency}")
        result["levels"].append(level)
    if kind == "embedded":
        result["bytes_on_disk"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        result["search_device"] = "cuda" if store._torch is not None else "cpu"  # type: ignore[attr-defined]
    store.close()
    if keep is None:
        shutil.rmtree(path, ignore_errors=True)
    return result


# End to end, served (the GPU machine)


def served(args: argparse.Namespace) -> dict:
    import httpx

    from bench.clip_gpu import TAGS, photo_jpegs, texts, write_model
    from bench.serving import ServedProduct
    from services.library.embedded import EmbeddedStore

    home = Path(tempfile.mkdtemp(prefix="bench-library-served-"))
    write_model(home, args.shape)
    library = home / "library"
    env = {
        "BENTOML_HOME": str(home),
        "MULTIMODAL_PROFILE": "production",
        "MULTIMODAL_CLIP_MODEL": TAGS[args.shape],
        "MULTIMODAL_FAMILIES": "clip",
        "MULTIMODAL_CACHE_BACKEND": "none",  # every text query is embedded
        "MULTIMODAL_GATEWAY_WORKERS": str(args.gateway_workers),
        "MULTIMODAL_CLIP_WORKERS": str(args.clip_workers),
        "MULTIMODAL_MAX_CONCURRENT_REQUESTS": "1024",
        "MULTIMODAL_LIBRARY_PATH": str(library),
        "MULTIMODAL_LIBRARY_SEARCH_DEVICE": args.search_device,
    }
    server = ServedProduct(3000, home / "serve.log", **env)
    results: dict[str, Any] = {"gateway_workers": args.gateway_workers, "clip_workers": args.clip_workers, "levels": []}
    try:
        server.wait_ready()
        url = f"{server.url}/v1/library/{COLLECTION}"
        jpegs = photo_jpegs(args.images)
        bodies = [
            {"images": [{"image": data_url(j), "metadata": {"photo": True}} for j in jpegs[i : i + 32]]}
            for i in range(0, len(jpegs), 32)
        ]
        client = httpx.Client(timeout=300)
        assert client.post(f"{url}/images", json=bodies[0]).status_code == 200  # creates the collection, warms up
        started = time.perf_counter()
        with tqdm(total=len(jpegs) - 32, desc="add photos (HTTP)", unit="img") as progress:
            from concurrent.futures import ThreadPoolExecutor

            def add(body: dict) -> None:
                response = client.post(f"{url}/images", json=body)
                assert response.status_code == 200, response.text
                progress.update(len(body["images"]))

            with ThreadPoolExecutor(args.add_concurrency) as pool:
                list(pool.map(add, bodies[1:]))
        seconds = time.perf_counter() - started
        results["add_images_per_s"] = (len(jpegs) - 32) / seconds
        in_flight = args.add_concurrency
        log(f"end to end add: {results['add_images_per_s']:,.0f} images/s (batches of 32, {in_flight} in flight)")

        store = EmbeddedStore(library, device="cpu")  # a second writer beside the server, on the same files
        dimensions = store.describe(COLLECTION).dimensions  # the served model's (768 for ViT-L/14)
        started = time.perf_counter()
        with tqdm(total=args.vectors, desc="load synthetic", unit="vec", unit_scale=True) as progress:
            for start, vectors in chunks(args.vectors, dimensions):
                store.upsert(
                    COLLECTION, [f"v{i}" for i in range(start, start + len(vectors))], vectors, [{}] * len(vectors)
                )
                progress.update(len(vectors))
        results["load_vectors_per_s"] = args.vectors / (time.perf_counter() - started)
        store.close()
        count = client.get(url).json()["count"]
        log(f"collection holds {count:,} images; loaded {results['load_vectors_per_s']:,.0f} vectors/s")
        results["count"] = count

        text_bodies = [json.dumps({"text": t, "top_k": 10}).encode() for t in texts(50_000)]
        vector_bodies = [
            json.dumps({"vector": q.tolist(), "top_k": 10}).encode()
            for q in make_queries(args.vectors, 256, dimensions)
        ]
        for _ in range(2 * args.gateway_workers):  # every worker copies the vectors to the GPU once
            client.post(f"{url}/search", content=text_bodies[0], headers={"content-type": "application/json"})
        for scenario, search_bodies in (("text", text_bodies), ("vector", vector_bodies)):
            if scenario not in args.scenarios:
                continue
            for clients in args.levels:
                level = run_level(
                    f"{url}/search",
                    search_bodies,
                    clients,
                    duration=args.duration,
                    warmup=args.warmup,
                    processes=args.client_processes,
                ).as_dict()
                level["scenario"] = scenario
                results["levels"].append(level)
                log(
                    f"{scenario} search, {clients} clients: {level['per_second']:,.0f} q/s, "
                    f"p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, {level['statuses']}"
                )
    finally:
        server.stop()
    return results


def data_url(jpeg: bytes) -> str:
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


# Output


def _style_axes(throughput: Any, latency: Any) -> None:
    """Both plots' axes: throughput and latency against clients, log-scaled."""
    for axis, label in ((throughput, "queries / s"), (latency, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if results["mode"] == "store":
        series = [(r["store"], [lv["clients"] for lv in r["levels"]], r["levels"], "qps") for r in results["stores"]]
        names = {r["store"]: f"{r['store']} ({r['vectors']:,} vectors)" for r in results["stores"]}
    else:
        scenarios = sorted({lv["scenario"] for lv in results["levels"]})
        rows = {s: [lv for lv in results["levels"] if lv["scenario"] == s] for s in scenarios}
        series = [(s, [lv["concurrency"] for lv in rows[s]], rows[s], "per_second") for s in scenarios]
        names = {s: f"{s} search over HTTP ({results['count']:,} images)" for s in scenarios}
    for name, clients, levels, key in series:
        left.plot(clients, [lv[key] for lv in levels], marker="o", label=names[name])
        right.plot(clients, [lv["p50_ms"] for lv in levels], marker="o", label=f"{name} p50")
        right.plot(clients, [lv["p99_ms"] for lv in levels], marker="^", linestyle="--", label=f"{name} p99")
    _style_axes(left, right)
    fig.suptitle(f"Image library, {results['mode']}, on {results['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_served_runs(runs: dict[str, dict], path: Path, scenario: str = "text") -> None:
    """Served runs side by side (one configuration each, measured in one device run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, results in runs.items():
        levels = [lv for lv in results["levels"] if lv["scenario"] == scenario]
        clients = [lv["concurrency"] for lv in levels]
        (line,) = left.plot(clients, [lv["per_second"] for lv in levels], marker="o", label=label)
        right.plot(clients, [lv["p50_ms"] for lv in levels], marker="o", color=line.get_color(), label=f"{label} p50")
        right.plot(
            clients, [lv["p99_ms"] for lv in levels], marker="^", linestyle="--", color=line.get_color(),
            label=f"{label} p99",
        )  # fmt: skip
    right.axhline(100, color="grey", linewidth=0.8, linestyle=":")  # the p99 target
    _style_axes(left, right)
    machine = next(iter(runs.values()))["machine"]
    fig.suptitle(f"Image library, {scenario} search through HTTP, on {machine}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPUs"
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["store", "served", "plot"], help="plot: served JSON files side by side")
    parser.add_argument("inputs", nargs="*", type=Path, help="plot: LABEL=FILE.json of served runs")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--stores", nargs="+", default=["embedded", "milvus"], choices=["embedded", "milvus"])
    parser.add_argument("--milvus-vectors", type=int, default=None, help="fewer vectors for Milvus Lite")
    parser.add_argument("--levels", type=int, nargs="+", default=None, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--shape", default="vit-l-14", help="served: the CLIP shape (random weights)")
    parser.add_argument("--gateway-workers", type=int, default=4, help="served: entry-service workers")
    parser.add_argument("--scenarios", nargs="+", default=["text", "vector"], choices=["text", "vector"])
    parser.add_argument("--clip-workers", type=int, default=2, help="served: CLIP service processes")
    parser.add_argument("--client-processes", type=int, default=4, help="served: load-generator processes")
    parser.add_argument("--images", type=int, default=1024, help="served: photographs added through HTTP")
    parser.add_argument("--add-concurrency", type=int, default=8, help="served: add requests in flight")
    parser.add_argument("--search-device", default="auto", choices=["auto", "cpu", "cuda"], help="embedded store")
    parser.add_argument("--keep", type=Path, default=None, help="store: keep the stores in this folder")
    parser.add_argument("--name", default=None, help="file name stem of the JSON and the plot")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "plot":
        pairs = (str(item).split("=", 1) for item in args.inputs)
        runs = {label: json.loads(Path(file).read_text()) for label, file in pairs}
        plot_served_runs(runs, args.out / f"{args.name or 'library_served_runs'}.png")
        return
    results: dict[str, Any] = {
        "mode": args.mode,
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.mode == "store":
        levels = args.levels or [1, 16, 64]
        results["stores"] = []
        for kind in args.stores:
            total = args.milvus_vectors if kind == "milvus" and args.milvus_vectors else args.vectors
            keep = args.keep / kind if args.keep else None
            results["stores"].append(
                bench_store(kind, total, levels, args.duration, args.warmup, keep, args.search_device)
            )
    else:
        args.levels = args.levels or [1, 16, 64, 256]
        results.update(served(args))
    stem = args.name or f"library_{args.mode}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    log(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
