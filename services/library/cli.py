"""Index a folder or a list of image files into a library collection, through the HTTP API.

    python -m services.library.cli index photos/ --collection photos --url http://localhost:3000

Each image's id is its path relative to the folder given (a file given by itself: relative to the
current directory), so running the same command again resumes: before sending a batch, the CLI asks
the server which of its ids the collection already holds (``POST .../lookup``) and sends only the
others, so nothing stored is read, sent or embedded again. An image the server refuses (it does not
decode, it is too large) is reported and left out; the rest of its batch is sent again.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
RETRIES = 8


@dataclass
class Summary:
    added: int = 0
    skipped: int = 0  # already in the collection
    failed: dict[str, str] = field(default_factory=dict)  # id -> why


def find_images(paths: list[Path]) -> list[tuple[str, Path]]:
    """(id, path) for every image under the folders and every file given, in a stable order."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    found[file.relative_to(path).as_posix()] = file
        elif path.is_file():
            found[Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()] = path
        else:
            raise SystemExit(f"no such file or folder: {path}")
    return list(found.items())


def batches(items: list[tuple[str, Path]], size: int) -> Iterator[list[tuple[str, Path]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Client:
    def __init__(self, url: str, collection: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.prefix = f"/v1/library/{collection}"

    def post(self, route: str, body: dict) -> httpx.Response:
        """POST, waiting and retrying while the server is busy (429, 503) or unreachable for a moment."""
        for attempt in range(RETRIES):
            try:
                response = self.http.post(self.prefix + route, json=body)
            except httpx.TransportError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(2**attempt)
                continue
            if response.status_code not in (429, 503) or attempt == RETRIES - 1:
                return response
            time.sleep(float(response.headers.get("Retry-After", 1)) * (attempt + 1))
        raise AssertionError("unreachable")

    def stored(self, ids: list[str]) -> set[str]:
        response = self.post("/lookup", {"ids": ids})
        if response.status_code == 404 and response.json()["error"]["code"] == "collection_not_found":
            return set()  # the first run: the first add creates the collection
        _check(response)
        return set(response.json()["found"])

    def add(self, batch: list[tuple[str, Path]], summary: Summary) -> int:
        """Sends the batch; an image the server refuses is recorded and the rest sent again."""
        images: list[dict[str, Any]] = []
        for item_id, path in batch:
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            data = base64.b64encode(path.read_bytes()).decode()
            images.append({"id": item_id, "image": f"data:{mime};base64,{data}", "metadata": {"path": item_id}})
        while images:
            response = self.post("/images", {"images": images})
            param = (response.json()["error"]["param"] or "") if response.status_code in (400, 413) else ""
            if param.startswith("images["):
                refused = images.pop(int(param[len("images[") :].split("]")[0]))
                summary.failed[refused["id"]] = response.json()["error"]["message"]
                continue
            _check(response)
            break
        return len(images)


def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise SystemExit(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")


def index(
    paths: list[Path], collection: str, url: str, batch_size: int, concurrency: int, api_key: str | None
) -> Summary:
    items = find_images(paths)
    client = Client(url, collection, api_key, timeout=300)
    summary, lock = Summary(), threading.Lock()
    with tqdm(total=len(items), unit="img", desc=collection) as progress:

        def run(batch: list[tuple[str, Path]]) -> None:
            stored = client.stored([item_id for item_id, _ in batch])
            todo = [(item_id, path) for item_id, path in batch if item_id not in stored]
            added = client.add(todo, summary) if todo else 0
            with lock:
                summary.added += added
                summary.skipped += len(batch) - len(todo)
                progress.update(len(batch))
                progress.set_postfix(added=summary.added, skipped=summary.skipped, failed=len(summary.failed))

        # Batches in flight at once keep the server's batcher fed while this process reads files.
        with ThreadPoolExecutor(concurrency) as pool:
            for done in [pool.submit(run, batch) for batch in batches(items, batch_size)]:
                done.result()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.library.cli", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("index", help="index folders or image files (resumable)")
    command.add_argument("paths", nargs="+", type=Path, help="folders (searched recursively) or image files")
    command.add_argument("--collection", required=True, help="the collection (created by the first add)")
    command.add_argument("--url", default="http://localhost:3000", help="the product's entry service")
    command.add_argument("--batch-size", type=int, default=32, help="images per request")
    command.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    command.add_argument("--api-key", default=os.environ.get("MULTIMODAL_API_KEY"), help="where API keys are set")
    args = parser.parse_args(argv)
    summary = index(args.paths, args.collection, args.url, args.batch_size, args.concurrency, args.api_key)
    print(f"added {summary.added}, already stored {summary.skipped}, refused {len(summary.failed)}")
    for item_id, why in summary.failed.items():
        print(f"  refused {item_id}: {why}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
