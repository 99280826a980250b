"""Steady load on every route for a while, or a burst past the in-flight limit, against a real
``bentoml serve`` on this machine: latency, status counts and the server's memory over time.

    python -m bench.soak --minutes 10                 # steady: every route, one client each
    python -m bench.soak --burst --minutes 0.5        # twice the in-flight limit on /v1/embeddings

It starts the product itself (tiny profile, every family, the model store of ``make models``)
unless ``--url`` names a server already running on this machine (loopback only). Load is closed
loop, bounded in time and in count. Inputs are realistic: photographs shipped with scikit-image
re-encoded as JPEG, speech made by espeak-ng. Results: ``soak.json`` (or ``burst.json``) and a plot
in ``--out``; the summary says how much the server's memory grew after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import psutil

from bench.clip_gpu import photo_jpegs
from bench.serving import ServedProduct

REPO = Path(__file__).resolve().parents[1]
MAX_REQUESTS = 1_000_000  # a bound besides time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    body: Callable[[int], dict]  # the i-th request: json=, content= and headers=, or files= and data=


def speech_wav(text: str, folder: Path) -> bytes:
    """espeak-ng's speech resampled by ffmpeg to 16 kHz mono WAV (as the Whisper tests make it)."""
    raw, wav = folder / "speech.raw.wav", folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(
        ["ffmpeg", "-y", "-loglevel", "error", "-i", str(raw), "-ar", "16000", "-ac", "1", str(wav)], check=True
    )
    return wav.read_bytes()


def photo_urls(count: int = 64) -> list[str]:
    return [f"data:image/jpeg;base64,{base64.b64encode(j).decode()}" for j in photo_jpegs(count)]


def burst_route(images_per_request: int) -> Route:
    """Photographs to ``/v1/embeddings``, several a request, the bodies encoded once (so that the
    load generator's own JSON work does not throttle it)."""
    images = photo_urls()
    bodies = [
        json.dumps({"model": "clip", "input": images[i : i + images_per_request]}).encode()
        for i in range(0, len(images) - images_per_request + 1, images_per_request)
    ]
    headers = {"content-type": "application/json"}
    name = f"embeddings, {images_per_request} images"
    return Route(name, "/v1/embeddings", lambda i: {"content": bodies[i % len(bodies)], "headers": headers})


def routes(folder: Path) -> list[Route]:
    images = photo_urls()
    texts = [f"a photo of a {noun}, number {i}" for i, noun in enumerate(["cat", "dog", "bicycle", "lake"] * 50)]
    speech = speech_wav("The quick brown fox jumps over the lazy dog. It was a sunny day.", folder)

    def audio(field: str) -> Callable[[int], dict]:
        return lambda i: {"files": {field: ("speech.wav", speech, "audio/wav")}, "data": {"model": "whisper-1"}}

    return [
        Route(
            "embeddings, text", "/v1/embeddings", lambda i: {"json": {"model": "clip", "input": texts[i % len(texts)]}}
        ),
        Route("embeddings, image", "/v1/embeddings", lambda i: {"json": {"model": "clip", "input": images[i % 64]}}),
        Route(
            "search",
            "/search",
            lambda i: {"json": {"image_data": images[i % 64], "texts": ["a cat", "a rocket", texts[i % len(texts)]]}},
        ),
        Route("classify", "/classify", lambda i: {"json": {"image_data": images[i % 64], "labels": ["cat", "coffee"]}}),
        Route(
            "chat",
            "/v1/chat/completions",
            lambda i: {
                "json": {
                    "model": "llava",
                    "max_tokens": 8,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is in this image?"},
                                {"type": "image_url", "image_url": {"url": images[i % 64]}},
                            ],
                        }
                    ],
                }
            },
        ),
        Route("transcriptions", "/v1/audio/transcriptions", audio("file")),
        Route("translations", "/v1/audio/translations", audio("file")),
        Route(
            "transcribe (original)", "/transcribe", lambda i: {"files": {"audio": ("speech.wav", speech, "audio/wav")}}
        ),
    ]


def server_processes(url: str, started: subprocess.Popen | None) -> list[psutil.Process]:
    """The serving processes: the started server's tree, or whatever listens on the URL's port and its tree."""
    if started is not None:
        root = psutil.Process(started.pid)
    else:
        port = urlsplit(url).port
        pid = next(
            c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"
        )
        root = psutil.Process(pid)
        while root.parent() is not None and "bentoml" in " ".join(root.parent().cmdline()):
            root = root.parent()
    return [root, *root.children(recursive=True)]


class MemorySampler(threading.Thread):
    """The serving processes' resident memory (MB, summed), every ``every`` seconds."""

    def __init__(self, processes: Callable[[], list[psutil.Process]], every: float) -> None:
        super().__init__(daemon=True)
        self.processes, self.every, self.samples = processes, every, []
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            total = 0
            for process in self.processes():
                with contextlib.suppress(psutil.Error):  # a worker that has just exited
                    total += process.memory_info().rss
            self.samples.append((time.monotonic() - started, total / 2**20))
            self.stopping.wait(self.every)


def _aiohttp_request(arguments: dict) -> dict:
    """A route's request (httpx-style ``json=``, ``content=``/``headers=`` or ``files=``/``data=``) for aiohttp."""
    if "files" in arguments:
        form = aiohttp.FormData()
        for name, value in arguments.get("data", {}).items():
            form.add_field(name, value)
        for field, (filename, payload, content_type) in arguments["files"].items():
            form.add_field(field, payload, filename=filename, content_type=content_type)
        return {"data": form}
    if "content" in arguments:
        return {"data": arguments["content"], "headers": arguments.get("headers", {})}
    return {"json": arguments["json"]}


async def drive(url: str, plan: list[tuple[Route, int]], seconds: float) -> list[tuple[str, float, float, str, bool]]:
    """Closed-loop clients (``plan``: route and client count) for ``seconds``: one record per answer,
    (route, seconds since start, latency, status, Retry-After present). aiohttp, whose client costs
    far less CPU than httpx's: the load generator shares this machine's cores with the server."""
    records: list[tuple[str, float, float, str, bool]] = []
    started = time.monotonic()
    stop = started + seconds

    async def client(http: aiohttp.ClientSession, route: Route, offset: int) -> None:
        i = offset
        while time.monotonic() < stop and len(records) < MAX_REQUESTS:
            sent = time.monotonic()
            try:
                async with http.post(url + route.path, **_aiohttp_request(route.body(i))) as response:
                    await response.read()
                    status, retry_after = str(response.status), "Retry-After" in response.headers
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, retry_after = type(exc).__name__, False
            records.append((route.name, sent - started, time.monotonic() - sent, status, retry_after))
            i += 7

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        await asyncio.gather(*(client(http, route, k) for route, clients in plan for k in range(clients)))
    return records


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(records: list, warmup_s: float, window_s: float) -> dict:
    by_route: dict[str, dict] = {}
    for name in dict.fromkeys(r[0] for r in records):
        mine = [r for r in records if r[0] == name and r[1] >= warmup_s]
        latencies = [1000 * r[2] for r in mine]
        windows: dict[int, list[float]] = defaultdict(list)
        for r in mine:
            windows[int(r[1] // window_s)].append(1000 * r[2])
        refused = [r for r in mine if r[3] in ("429", "503")]
        by_route[name] = {
            "requests": len(mine),
            "statuses": dict(Counter(r[3] for r in mine)),
            "p50_ms": statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": percentile(latencies, 0.99),
            "refusals_without_retry_after": sum(not r[4] for r in refused),
            "refusal_p50_ms": statistics.median([1000 * r[2] for r in refused]) if refused else None,
            "refusal_p99_ms": percentile([1000 * r[2] for r in refused], 0.99) if refused else None,
            "p99_ms_by_window": {k * window_s: percentile(v, 0.99) for k, v in sorted(windows.items())},
        }
    return by_route


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    times, megabytes = zip(*result["memory_mb"], strict=True) if result["memory_mb"] else ((), ())
    memory.plot([t / 60 for t in times], megabytes)
    memory.axvline(result["warmup_s"] / 60, color="grey", linestyle="--", label="end of warm-up")
    memory.set_ylabel("server resident memory (MB)")
    memory.legend()
    for name, route in result["routes"].items():
        points = sorted((float(t), v) for t, v in route["p99_ms_by_window"].items())
        if points:
            latency.plot([t / 60 for t, _ in points], [v for _, v in points], marker=".", label=name)
    latency.set_yscale("log")
    latency.set_ylabel("p99 latency per window (ms)")
    latency.set_xlabel("minutes")
    latency.legend(fontsize=7)
    figure.suptitle(result["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--warmup-minutes", type=float, default=1.0, help="excluded from the figures and the memory baseline"
    )
    parser.add_argument("--clients", type=int, default=1, help="clients per route (steady)")
    parser.add_argument("--burst", action="store_true", help="twice --limit clients on /v1/embeddings instead")
    parser.add_argument("--images-per-request", type=int, default=16, help="photographs per burst request")
    parser.add_argument("--limit", type=int, default=8, help="MULTIMODAL_MAX_CONCURRENT_REQUESTS of the started server")
    parser.add_argument("--url", help="a server already running on this machine (else one is started)")
    parser.add_argument("--port", type=int, default=3010)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    server = None
    if args.url is None:
        env = {"MULTIMODAL_GATEWAY_WORKERS": "1", "MULTIMODAL_MAX_CONCURRENT_REQUESTS": str(args.limit)}
        if args.burst:  # every request reaches the model, so that requests overlap
            env.update(MULTIMODAL_FAMILIES="clip", MULTIMODAL_CACHE_BACKEND="none")
        server = ServedProduct(
            args.port, Path(tempfile.mkdtemp(prefix="soak-")) / "serve.log", MULTIMODAL_PROFILE="tiny", **env
        )
        log("starting the product (bentoml serve, tiny profile)")
        server.wait_ready()
    url = args.url or server.url
    assert urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"), "load only servers on this machine"
    try:
        if args.burst:
            plan = [(burst_route(args.images_per_request), 2 * args.limit)]
            title = f"burst: {2 * args.limit} clients against an in-flight limit of {args.limit}"
        else:
            with tempfile.TemporaryDirectory() as folder:
                every = routes(Path(folder))
            plan = [(route, args.clients) for route in every]
            title = f"steady load: {args.clients} client(s) on each of {len(every)} routes"
        processes = server_processes(url, server.process if server else None)
        sampler = MemorySampler(lambda: processes, every=5.0)
        sampler.start()
        seconds, warmup = 60 * args.minutes, 60 * min(args.warmup_minutes, args.minutes / 2)
        log(f"{title}, {args.minutes:g} min")
        records = asyncio.run(drive(url, plan, seconds))
        sampler.stopping.set()
        sampler.join()
    finally:
        if server is not None:
            server.stop()

    after_warmup = [mb for t, mb in sampler.samples if t >= warmup]
    result = {
        "title": title,
        "minutes": args.minutes,
        "warmup_s": warmup,
        "routes": summarize(records, warmup, window_s=30.0),
        "memory_mb": sampler.samples,
        "memory_growth_after_warmup": (after_warmup[-1] / after_warmup[0] - 1) if after_warmup else None,
        "memory_peak_mb": max(after_warmup) if after_warmup else None,
    }
    name = "burst" if args.burst else "soak"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{name}.png")
    for route, row in result["routes"].items():
        refusal = (
            f", refusals p50 {row['refusal_p50_ms']:.1f} ms p99 {row['refusal_p99_ms']:.1f} ms"
            if row["refusal_p50_ms"]
            else ""
        )
        log(
            f"{route:<24} {row['requests']:>6} answers {row['statuses']}, "
            f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms{refusal}"
        )
    growth = result["memory_growth_after_warmup"]
    log(
        f"server memory after warm-up: {after_warmup[0]:,.0f} MB -> {after_warmup[-1]:,.0f} MB ({growth:+.1%}), "
        f"peak {result['memory_peak_mb']:,.0f} MB"
    )
    log(f"wrote {args.out / f'{name}.json'} and its plot")


if __name__ == "__main__":
    main()
