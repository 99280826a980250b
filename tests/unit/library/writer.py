"""A process that adds batches to a library store in a loop and reports each acknowledged batch on
stdout, for the crash test (test_store.py kills it with SIGKILL mid-add and reopens the store)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from services.library.store import CollectionModel, LibraryStore

DIMENSIONS = 64
MODEL = CollectionModel("crash-test", 7, DIMENSIONS)


def batch(number: int, size: int) -> tuple[list[str], np.ndarray]:
    """Batch ``number``: its ids and unit vectors, the same every time it is asked for."""
    vectors = np.random.default_rng(number).standard_normal((size, DIMENSIONS)).astype(np.float32)
    return [f"b{number}-{i}" for i in range(size)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def open_store(kind: str, path: Path) -> LibraryStore:
    if kind == "milvus":
        from services.library.milvus import MilvusStore

        return MilvusStore(str(path / "milvus.db"))
    from services.library.embedded import EmbeddedStore

    # embedded-torch: the GPU path's code (torch, float16 on the device) run on the CPU
    return EmbeddedStore(path, device="torch-cpu" if kind == "embedded-torch" else "cpu")


if __name__ == "__main__":
    kind, path, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    store = open_store(kind, path)
    store.ensure("crash", MODEL)
    number = 0
    while True:
        ids, vectors = batch(number, size)
        store.upsert("crash", ids, vectors, [{"batch": number}] * size)
        print(number, flush=True)  # acknowledged: upsert returned
        number += 1
