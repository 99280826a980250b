"""The default library store: a directory per collection on this host, nothing to set up.

Each collection is two files:

- ``vectors.f16``: float16 rows, appended and never rewritten in place, memory-mapped for search
  (a million ViT-L/14 vectors are 1.5 GB);
- ``items.sqlite`` (WAL mode): one row per slot of that file (id, metadata, the commit that
  deleted it) and a ``meta`` table with the model, the committed slot count and a commit counter.

Why it is crash safe: an add takes SQLite's write lock (``BEGIN IMMEDIATE``, which also orders
writers in other processes), writes its vectors past the committed count, fsyncs them, then
commits their rows and the new count in one transaction. A kill before the commit leaves only
bytes past the committed count, which readers never look at and the next add overwrites; after
the commit every row's vector is already on disk. Replacing or deleting an id marks its old slot
deleted in the same kind of transaction (slots are never reused, so a reader never sees a slot
change meaning; the space of deleted slots is not reclaimed).

Readers (any thread or process) keep a view of the committed slots: on each search they read the
commit counter and, when it moved, map the new rows and mark the newly deleted slots, reading both
in one snapshot. Search is exact: a matrix product over every live row, on the GPU with torch when
there is one (the float16 rows copied there once), else with numpy over a float32 copy in memory
(numpy has no fast float16 arithmetic: converting a million rows took 1.4 s per search on this CPU,
against 50 ms for the product itself), in blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.library.store import (
    CollectionModel,
    Filter,
    Metadata,
    StoredHit,
    check_dimensions,
    collection_not_found,
)

log = logging.getLogger(__name__)

DB_NAME, VECTORS_NAME = "items.sqlite", "vectors.f16"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slots (
    slot INTEGER PRIMARY KEY, id TEXT NOT NULL, metadata TEXT NOT NULL, deleted_seq INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS live_ids ON slots (id) WHERE deleted_seq IS NULL;
CREATE INDEX IF NOT EXISTS deletions ON slots (deleted_seq) WHERE deleted_seq IS NOT NULL;
"""
# Rows multiplied at a time on the CPU: bounds the scores matrix (64k rows x 64 queries x 4 bytes = 16 MB).
CPU_BLOCK_ROWS = 65_536
SQL_CHUNK = 500  # host parameters per statement, well under SQLite's limit


def _where_sql(where: Filter) -> tuple[str, list[Any]]:
    """SQL for metadata equality (``store.matches``); keys are checked names (protocol.KEY_PATTERN), quoted still."""
    clauses, params = [], []
    for key, value in where.items():
        clauses.append("json_extract(metadata, ?) = ?")  # JSON true reads as 1, as Milvus compares it
        params += [f'$."{key}"', value]
    return " AND ".join(clauses), params


def _torch_backend(device: str) -> tuple[Any, str]:
    """(torch, its device) when search should run with torch, else (None, "cpu"). ``auto`` looks for an
    NVIDIA device node before importing torch, so a CPU-only entry service never pays torch's import.
    ``torch-cpu`` runs the GPU path's code on the CPU: for tests on machines without a GPU."""
    if device == "cpu" or (device == "auto" and not os.path.exists("/dev/nvidiactl")):
        return None, "cpu"
    import torch

    if device == "torch-cpu":
        return torch, "cpu"
    if torch.cuda.is_available():
        return torch, "cuda"
    if device == "cuda":
        raise RuntimeError("MULTIMODAL_LIBRARY_SEARCH_DEVICE=cuda but CUDA is not available")
    return None, "cpu"


class _View:
    """What a reader knows of the committed state: rows mapped, which are live, on which device."""

    def __init__(self) -> None:
        self.seq = -1
        self.count = 0
        self.live = np.zeros(0, dtype=bool)
        self.rows: np.ndarray | None = None  # the memory map of the committed rows
        self.host_rows: np.ndarray | None = None  # CPU search: float32 copy, capacity >= count
        self.device_rows: Any = None  # GPU search: torch float16 tensor on CUDA, capacity >= count
        self.device_live: Any = None


class Collection:
    def __init__(self, directory: Path, dimensions: int, torch: Any, torch_device: str) -> None:
        self.directory, self.dimensions, self.torch, self.torch_device = directory, dimensions, torch, torch_device
        self.row_bytes = dimensions * 2
        self._local = threading.local()
        self._write_lock = threading.Lock()  # one writer per process; BEGIN IMMEDIATE orders processes
        self._view_lock = threading.Lock()
        self._view = _View()
        self._fd = os.open(directory / VECTORS_NAME, os.O_RDWR | os.O_CREAT, 0o644)

    # Connections: one per thread (a connection in a write transaction must not serve another thread's read).

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.directory / DB_NAME)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, int, int, int]]:
        """A write transaction holding SQLite's write lock: (conn, committed count, live count, next seq)."""
        with self._write_lock:
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('count', 'live', 'seq')"))
                yield conn, int(meta["count"]), int(meta["live"]), int(meta["seq"]) + 1
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def upsert(self, ids: list[str], vectors: np.ndarray, metadata: list[Metadata]) -> None:
        last = {item_id: i for i, item_id in enumerate(ids)}  # a repeated id: the last one wins
        keep = sorted(last.values())
        rows = np.ascontiguousarray(vectors[keep], dtype=np.float16)
        with self._write() as (conn, count, live, seq):
            # Past the committed count, so no reader looks at these bytes until the commit below.
            os.pwrite(self._fd, rows.tobytes(), count * self.row_bytes)
            os.fsync(self._fd)
            replaced = 0
            for i in keep:
                replaced += conn.execute(
                    "UPDATE slots SET deleted_seq = ? WHERE id = ? AND deleted_seq IS NULL", (seq, ids[i])
                ).rowcount
            conn.executemany(
                "INSERT INTO slots (slot, id, metadata) VALUES (?, ?, ?)",
                [(count + n, ids[i], json.dumps(metadata[i])) for n, i in enumerate(keep)],
            )
            _set_meta(conn, count=count + len(keep), live=live + len(keep) - replaced, seq=seq)

    def delete(self, ids: list[str]) -> int:
        deleted = 0
        with self._write() as (conn, count, live, seq):
            for start in range(0, len(ids), SQL_CHUNK):
                chunk = ids[start : start + SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"UPDATE slots SET deleted_seq = ? WHERE deleted_seq IS NULL AND id IN ({marks})"
                deleted += conn.execute(sql, (seq, *chunk)).rowcount
            _set_meta(conn, count=count, live=live - deleted, seq=seq)
        return deleted

    def count(self) -> int:
        return int(self.conn().execute("SELECT value FROM meta WHERE key = 'live'").fetchone()[0])

    def lookup(self, ids: list[str]) -> list[str]:
        found: set[str] = set()
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start : start + SQL_CHUNK]
            sql = f"SELECT id FROM slots WHERE deleted_seq IS NULL AND id IN ({','.join('?' * len(chunk))})"
            found.update(row[0] for row in self.conn().execute(sql, chunk))
        return [item_id for item_id in dict.fromkeys(ids) if item_id in found]

    def page(self, after: str | None, limit: int) -> list[tuple[str, Metadata]]:
        rows = self.conn().execute(
            "SELECT id, metadata FROM slots WHERE deleted_seq IS NULL AND id > ? ORDER BY id LIMIT ?",
            (after if after is not None else "", limit),
        )
        return [(item_id, json.loads(metadata)) for item_id, metadata in rows]

    # Reading

    def _refresh(self) -> _View:
        """The view of the latest commit: new rows mapped (and copied to the GPU), deletions marked."""
        conn = self.conn()
        seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
        view = self._view
        if seq == view.seq:
            return view
        with self._view_lock:
            view = self._view
            conn.execute("BEGIN")  # one snapshot for the count and the deletions
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('count', 'seq')"))
                seq, count = int(meta["seq"]), int(meta["count"])
                deleted = [row[0] for row in conn.execute("SELECT slot FROM slots WHERE deleted_seq > ?", (view.seq,))]
            finally:
                conn.execute("COMMIT")
            if seq == view.seq:
                return view
            new = _View()
            new.seq, new.count = seq, count
            new.live = np.ones(count, dtype=bool)
            new.live[: view.count] = view.live
            new.live[deleted] = False
            new.rows = (
                np.memmap(self.directory / VECTORS_NAME, dtype=np.float16, mode="r", shape=(count, self.dimensions))
                if count
                else None
            )
            if self.torch is not None:
                self._to_device(view, new)
            else:
                self._to_host(view, new)
            self._view = new  # searches already running keep the view they started with
            return new

    def _to_host(self, old: _View, new: _View) -> None:
        capacity = 0 if old.host_rows is None else len(old.host_rows)
        if new.count > capacity:  # grow by doubling, so a stream of small adds copies each row about twice
            grown = np.empty((max(new.count, 2 * capacity, 1024), self.dimensions), dtype=np.float32)
            if old.count:
                assert old.host_rows is not None
                grown[: old.count] = old.host_rows[: old.count]
            new.host_rows = grown
        else:
            new.host_rows = old.host_rows
        if new.count > old.count and new.rows is not None:
            assert new.host_rows is not None
            new.host_rows[old.count : new.count] = new.rows[old.count :]  # converts to float32

    def _to_device(self, old: _View, new: _View) -> None:
        torch = self.torch
        capacity = 0 if old.device_rows is None else old.device_rows.shape[0]
        if new.count > capacity:  # grow by doubling, so a stream of small adds copies each row about twice
            grown = torch.empty(
                (max(new.count, 2 * capacity, 1024), self.dimensions), dtype=torch.float16, device=self.torch_device
            )
            if old.count:
                grown[: old.count] = old.device_rows[: old.count]
            new.device_rows = grown
        else:
            new.device_rows = old.device_rows
        if new.count > old.count and new.rows is not None:
            new.device_rows[old.count : new.count] = torch.from_numpy(np.array(new.rows[old.count :])).to(
                self.torch_device
            )
        new.device_live = torch.from_numpy(new.live).to(self.torch_device)

    def search(self, queries: np.ndarray, top_k: int, where: Filter | None) -> list[list[StoredHit]]:
        view = self._refresh()
        candidates: np.ndarray | None = None  # the slots a filter allows, in the view's snapshot
        if where:
            clause, params = _where_sql(where)
            sql = f"SELECT slot FROM slots WHERE deleted_seq IS NULL AND slot < ? AND {clause}"
            candidates = np.fromiter((row[0] for row in self.conn().execute(sql, (view.count, *params))), np.int64)
            candidates = candidates[view.live[candidates]]
        if view.rows is None or (candidates is not None and not len(candidates)):
            return [[] for _ in queries]
        if self.torch is not None:
            slots, scores = self._search_torch(view, queries, top_k, candidates)
        else:
            slots, scores = self._search_cpu(view, queries, top_k, candidates)
        return self._hits(slots, scores)

    def _search_torch(
        self, view: _View, queries: np.ndarray, top_k: int, candidates: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Float16 products pick candidates (a few more than asked for); their scores are then computed
        again in float32, so the ranking and the scores are those of the CPU path, not float16's
        (whose rounding of a score near 0.3 is 2e-4: enough to swap neighbours)."""
        torch = self.torch
        q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.torch_device)
        rows = view.device_rows[: view.count]
        if candidates is None:
            scores = q32.half() @ rows.T
            scores.masked_fill_(~view.device_live, float("-inf"))
            index = None
        else:
            index = torch.from_numpy(candidates).to(self.torch_device)
            scores = q32.half() @ rows.index_select(0, index).T
        wide = min(2 * top_k + 32, scores.shape[1])
        rough, at = torch.topk(scores, wide, dim=1)
        if index is not None:
            at = index[at]
        exact = torch.einsum("qkd,qd->qk", rows[at].float(), q32)  # (queries, wide), float32
        exact.masked_fill_(torch.isinf(rough), float("-inf"))  # deleted rows stay out
        best, order = torch.topk(exact, min(top_k, wide), dim=1)
        return torch.gather(at, 1, order).cpu().numpy(), best.cpu().numpy()

    def _search_cpu(
        self, view: _View, queries: np.ndarray, top_k: int, candidates: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert view.host_rows is not None
        q = np.ascontiguousarray(queries, dtype=np.float32).T
        total = view.count if candidates is None else len(candidates)
        best_slots, best_scores = [], []
        for start in range(0, total, CPU_BLOCK_ROWS):
            stop = min(start + CPU_BLOCK_ROWS, total)
            if candidates is None:
                slots = np.arange(start, stop)
                block = view.host_rows[start:stop]
            else:
                slots = candidates[start:stop]
                block = view.host_rows[slots]
            scores = block @ q  # (rows, queries)
            if candidates is None:
                scores[~view.live[start:stop]] = -np.inf
            k = min(top_k, len(slots))
            top = np.argpartition(-scores, k - 1, axis=0)[:k] if k < len(slots) else np.argsort(-scores, axis=0)
            best_slots.append(slots[top])
            best_scores.append(np.take_along_axis(scores, top, axis=0))
        slots_all, scores_all = np.concatenate(best_slots).T, np.concatenate(best_scores).T  # (queries, candidates)
        order = np.argsort(-scores_all, axis=1, kind="stable")[:, :top_k]
        return np.take_along_axis(slots_all, order, axis=1), np.take_along_axis(scores_all, order, axis=1)

    def _hits(self, slots: np.ndarray, scores: np.ndarray) -> list[list[StoredHit]]:
        wanted = sorted({int(slot) for slot, score in zip(slots.flat, scores.flat, strict=True) if score > -np.inf})
        rows: dict[int, tuple[str, Metadata]] = {}
        for start in range(0, len(wanted), SQL_CHUNK):
            chunk = wanted[start : start + SQL_CHUNK]
            sql = f"SELECT slot, id, metadata FROM slots WHERE slot IN ({','.join('?' * len(chunk))})"
            rows.update((slot, (item_id, json.loads(meta))) for slot, item_id, meta in self.conn().execute(sql, chunk))
        return [
            [
                StoredHit(rows[int(slot)][0], float(score), rows[int(slot)][1])
                for slot, score in zip(query_slots, query_scores, strict=True)
                if score > -np.inf
            ]
            for query_slots, query_scores in zip(slots, scores, strict=True)
        ]

    def close(self) -> None:
        os.close(self._fd)


def connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are the explicit BEGIN ... COMMIT above.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer, nor it for them
    conn.execute("PRAGMA synchronous=FULL")  # an acknowledged add survives a power cut too, not only a kill
    return conn


def _set_meta(conn: sqlite3.Connection, **values: int) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, str(v)) for k, v in values.items()])


class EmbeddedStore:
    """Collections as directories under ``root``; see the module's docstring."""

    def __init__(self, root: Path, device: str = "auto") -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._torch, self._torch_device = _torch_backend(device)
        self._open: dict[str, tuple[Collection, CollectionModel]] = {}
        self._lock = threading.Lock()
        log.info("library: embedded store in %s, searching with %s", root, "torch" if self._torch else "numpy")

    def collections(self) -> list[str]:
        return sorted(path.parent.name for path in self.root.glob(f"*/{DB_NAME}") if self._model(path.parent.name))

    def _model(self, name: str) -> CollectionModel | None:
        path = self.root / name / DB_NAME
        if not path.exists():
            return None
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        except sqlite3.OperationalError:  # created by a process that died before its first commit
            return None
        finally:
            conn.close()
        return CollectionModel.from_json(row[0]) if row else None

    def _get(self, name: str) -> tuple[Collection, CollectionModel]:
        opened = self._open.get(name)
        if opened is not None:
            return opened
        with self._lock:
            if name not in self._open:
                model = self._model(name)
                if model is None:
                    raise collection_not_found(name)
                self._open[name] = (
                    Collection(self.root / name, model.dimensions, self._torch, self._torch_device),
                    model,
                )
            return self._open[name]

    def describe(self, collection: str) -> CollectionModel:
        return self._get(collection)[1]

    def ensure(self, collection: str, model: CollectionModel) -> None:
        if collection not in self._open:
            directory = self.root / collection
            directory.mkdir(exist_ok=True)
            conn = connect(directory / DB_NAME)
            try:
                conn.executescript(SCHEMA)  # IF NOT EXISTS: two processes creating it at once both succeed
                conn.execute("BEGIN IMMEDIATE")  # and the first one's model is the collection's
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('model', ?)", (model.to_json(),))
                for key in ("count", "live", "seq"):
                    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, '0')", (key,))
                conn.execute("COMMIT")
            finally:
                conn.close()
        self.describe(collection).check_same(collection, model)

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, metadata: list[Metadata]) -> None:
        target, model = self._get(collection)
        check_dimensions(vectors, model.dimensions, "vector")
        target.upsert(ids, vectors, metadata)

    def delete(self, collection: str, ids: list[str]) -> int:
        return self._get(collection)[0].delete(ids)

    def search(self, collection: str, queries: np.ndarray, top_k: int, where: Filter | None) -> list[list[StoredHit]]:
        target, model = self._get(collection)
        check_dimensions(queries, model.dimensions, "vector")
        return target.search(queries, top_k, where)

    def lookup(self, collection: str, ids: list[str]) -> list[str]:
        return self._get(collection)[0].lookup(ids)

    def page(self, collection: str, after: str | None, limit: int) -> list[tuple[str, Metadata]]:
        return self._get(collection)[0].page(after, limit)

    def count(self, collection: str) -> int:
        return self._get(collection)[0].count()

    def close(self) -> None:
        with self._lock:
            for target, _ in self._open.values():
                target.close()
            self._open.clear()
