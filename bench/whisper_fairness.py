"""Short clips' latency alone and during one long upload, against a Whisper server on this machine.

The tests check the order (short clips finish before a long recording sent first); this
measures how long they take: ``--short`` sent ``--alone`` times one after another, then one
``--long`` upload with ``--during`` short clips sent one after another while it runs.

    python -m bench.whisper_fairness --url http://127.0.0.1:3000 --long long.wav --short clip.wav
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def transcribe(url: str, audio: bytes, timeout: float) -> tuple[float, int]:
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/transcribe", files={"file": ("audio.wav", audio)}, data={"language": "en"}, timeout=timeout
    )
    return time.perf_counter() - started, response.status_code


def summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    return {"n": len(latencies), "p50_s": round(statistics.median(latencies), 3), "max_s": round(max(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--long", type=Path, required=True, help="a long recording (WAV)")
    parser.add_argument("--short", type=Path, required=True, help="a clip of a few seconds (WAV)")
    parser.add_argument("--alone", type=int, default=5)
    parser.add_argument("--during", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("loopback servers only")
    long, short = args.long.read_bytes(), args.short.read_bytes()

    transcribe(args.url, short, args.timeout)  # warm-up
    alone = [transcribe(args.url, short, args.timeout)[0] for _ in range(args.alone)]
    during: list[float] = []
    statuses: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        upload = pool.submit(transcribe, args.url, long, args.timeout)
        time.sleep(1.0)  # the upload is decoded and its windows queued
        for _ in range(args.during):
            if upload.done():
                break
            seconds, status = transcribe(args.url, short, args.timeout)
            during.append(seconds)
            statuses.append(status)
        long_seconds, long_status = upload.result()
    report = {
        "short_alone": summary(alone),
        "short_during_long_upload": summary(during),
        "short_statuses": statuses,
        "long": {"seconds": round(long_seconds, 3), "status": long_status},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
