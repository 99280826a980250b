"""Both library stores, real engines (SQLite and memory-mapped files; milvus-lite): results equal a
brute-force numpy search over the same vectors, through deletes, replacements, restarts and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import APIError
from services.library.store import CollectionModel, LibraryStore, matches
from tests.unit.library.writer import DIMENSIONS, MODEL, batch, open_store

REPO = Path(__file__).resolve().parents[3]
KINDS = ["embedded", "milvus"]
# Search itself also through the GPU path's code (torch, float16 rows on the device), here on the CPU.
SEARCH_KINDS = [*KINDS, "embedded-torch"]
# Float16 storage (embedded) rounds each component to 11 significant bits: a unit vector's scores move by <1e-3.
TOLERANCE = 1e-3


def unit_vectors(count: int, seed: int, dimensions: int = DIMENSIONS) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def reopen(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], LibraryStore]]:
    """Opens the store in ``tmp_path``, closing the one opened before (a restart)."""
    kind = request.param
    opened: list[LibraryStore] = []

    def reopen_store() -> LibraryStore:
        if opened:
            opened.pop().close()
        opened.append(open_store(kind, tmp_path))
        return opened[-1]

    reopen_store.kind = kind  # type: ignore[attr-defined]
    yield reopen_store
    for store in opened:
        store.close()


class BruteForce:
    """What the store should hold, searched with numpy in float32."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[np.ndarray, dict]] = {}

    def add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> None:
        for item_id, vector, meta in zip(ids, vectors, metadata, strict=True):
            self.items[item_id] = (vector, meta)

    def search(self, query: np.ndarray, top_k: int, where: dict | None = None) -> list[tuple[str, float]]:
        ids = [i for i, (_, meta) in self.items.items() if where is None or matches(meta, where)]
        if not ids:
            return []
        scores = np.stack([self.items[i][0] for i in ids]) @ query
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(ids[i], float(scores[i])) for i in order]


def assert_same_results(
    store: LibraryStore, expected: BruteForce, queries: np.ndarray, top_k: int, where=None, exact_order=True
):
    """Same ids (in the same order) and scores within TOLERANCE. With ``exact_order`` off (a ranking of the
    whole collection, where float16 rounding can swap two scores closer than TOLERANCE), same ids and
    each rank's score within TOLERANCE."""
    found = store.search("photos", queries, top_k, where)
    assert len(found) == len(queries)
    for hits, query in zip(found, queries, strict=True):
        want = expected.search(query, top_k, where)
        if exact_order:
            assert [hit.id for hit in hits] == [item_id for item_id, _ in want]
        else:
            assert sorted(hit.id for hit in hits) == sorted(item_id for item_id, _ in want)
        np.testing.assert_allclose([hit.score for hit in hits], [score for _, score in want], atol=TOLERANCE)
        true_scores = [float(expected.items[hit.id][0] @ query) for hit in hits]
        np.testing.assert_allclose([hit.score for hit in hits], true_scores, atol=TOLERANCE)
        for hit in hits:
            assert hit.metadata == expected.items[hit.id][1]
            assert where is None or matches(hit.metadata, where)


@pytest.mark.parametrize("reopen", SEARCH_KINDS, indirect=True)
def test_add_search_delete_restart_search_equal_brute_force(reopen):
    store = reopen()
    store.ensure("photos", MODEL)
    expected = BruteForce()
    vectors = unit_vectors(600, seed=1)
    ids = [f"img-{i:04d}" for i in range(600)]
    metadata = [{"group": i % 5, "even": i % 2 == 0, "name": f"n{i}"} for i in range(600)]
    for start in (0, 250):  # two adds
        stop = 600 if start else 250
        store.upsert("photos", ids[start:stop], vectors[start:stop], metadata[start:stop])
        expected.add(ids[start:stop], vectors[start:stop], metadata[start:stop])
    queries = unit_vectors(8, seed=2)
    assert store.count("photos") == 600
    assert_same_results(store, expected, queries, 10)
    assert_same_results(store, expected, queries, 7, {"group": 3})
    assert_same_results(store, expected, queries, 5, {"group": 2, "even": True})
    assert_same_results(store, expected, queries, 5, {"name": "n17"})
    assert store.search("photos", queries[:1], 5, {"name": "nobody"}) == [[]]

    gone = ids[::7]
    assert store.delete("photos", [*gone, "never-added"]) == len(gone)
    for item_id in gone:
        del expected.items[item_id]
    assert store.count("photos") == len(expected.items)
    assert_same_results(store, expected, queries, 10)
    assert_same_results(store, expected, queries, 3, {"group": 0})

    store = reopen()  # a restart: everything comes back from disk
    assert store.collections() == ["photos"]
    assert store.describe("photos") == MODEL
    assert store.count("photos") == len(expected.items)
    assert_same_results(store, expected, queries, 10)
    assert_same_results(store, expected, queries, 10, {"even": False})
    # Top k larger than the collection: everything, ranked.
    assert_same_results(store, expected, queries[:2], 1000, exact_order=False)


@pytest.mark.parametrize("reopen", SEARCH_KINDS, indirect=True)
def test_adding_an_id_again_replaces_it(reopen):
    store = reopen()
    store.ensure("photos", MODEL)
    first, second = unit_vectors(2, seed=3)
    store.upsert("photos", ["x", "y"], np.stack([first, second]), [{"v": 1}, {"v": 0}])
    store.upsert("photos", ["x"], second[None], [{"v": 2}])
    store.upsert("photos", ["x"], second[None], [{"v": 2}])  # the same add twice: idempotent
    assert store.count("photos") == 2
    hits = store.search("photos", first[None], 10, None)[0]
    assert [hit.id for hit in hits] == ["x", "y"] or [hit.id for hit in hits] == ["y", "x"]
    assert {hit.id: hit.metadata for hit in hits} == {"x": {"v": 2}, "y": {"v": 0}}
    assert all(abs(hit.score - float(first @ second)) < TOLERANCE for hit in hits)
    # One call naming an id twice keeps the last.
    store.upsert("photos", ["z", "z"], np.stack([first, second]), [{"v": 3}, {"v": 4}])
    assert store.count("photos") == 3
    assert store.search("photos", second[None], 10, {"v": 4})[0][0].id == "z"
    assert store.search("photos", second[None], 10, {"v": 3}) == [[]]
    assert reopen().count("photos") == 3


@pytest.mark.parametrize("reopen", KINDS, indirect=True)
def test_client_errors(reopen):
    store = reopen()
    with pytest.raises(APIError) as unknown:
        store.describe("nope")
    assert (unknown.value.status, unknown.value.code) == (404, "collection_not_found")
    assert store.collections() == []
    store.ensure("photos", MODEL)
    store.ensure("photos", MODEL)  # again: nothing to do
    with pytest.raises(APIError) as other_model:
        store.ensure("photos", CollectionModel("another", MODEL.fingerprint + 1, DIMENSIONS))
    assert (other_model.value.status, other_model.value.code) == (409, "model_mismatch")
    for call in (
        lambda: store.upsert("photos", ["a"], unit_vectors(1, 0, DIMENSIONS + 1), [{}]),
        lambda: store.search("photos", unit_vectors(1, 0, DIMENSIONS - 1), 3, None),
    ):
        with pytest.raises(APIError) as wrong_size:
            call()
        assert (wrong_size.value.status, wrong_size.value.code) == (400, "dimension_mismatch")
    assert store.count("photos") == 0
    assert store.search("photos", unit_vectors(1, 0), 3, None) == [[]]


@pytest.mark.parametrize("reopen", KINDS, indirect=True)
def test_pages_and_lookup(reopen):
    store = reopen()
    store.ensure("photos", MODEL)
    ids = [f"id{i:03d}" for i in range(57)]
    store.upsert("photos", ids[::-1], unit_vectors(57, seed=4), [{"i": i} for i in range(57)])
    store.delete("photos", ["id010"])
    seen, after = [], None
    while page := store.page("photos", after, 10):
        seen += [item_id for item_id, _ in page]
        after = page[-1][0]
    assert seen == sorted(set(ids) - {"id010"})
    assert store.lookup("photos", ["id005", "id010", "zzz", "id005"]) == ["id005"]


def acknowledged(lines: list[str]) -> list[int]:
    return [int(line) for line in lines if line.strip().isdigit()]


@pytest.mark.parametrize("reopen", KINDS, indirect=True)
def test_a_writer_killed_mid_add_leaves_every_acknowledged_add(reopen, tmp_path):
    """SIGKILL to a process adding batches in a loop (and to milvus-lite's server with it): on reopening, every
    batch it acknowledged is there, whole, with its vectors; a batch it had not finished is wholly absent."""
    kind = reopen.kind
    size = 300
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.library.writer", kind, str(tmp_path), str(size)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert writer.stdout is not None
    while len(acknowledged(lines)) < 4:
        line = writer.stdout.readline()
        assert line or writer.poll() is None, "the writer exited"
        lines.append(line)
    time.sleep(np.random.default_rng().uniform(0, 0.2))  # somewhere inside a later add
    os.killpg(writer.pid, signal.SIGKILL)
    lines += writer.stdout.read().splitlines()
    writer.wait()
    acked = acknowledged(lines)
    assert acked == list(range(len(acked)))

    store = reopen()
    count = store.count("crash")
    assert count % size == 0, "a batch is all or nothing"
    stored_batches = count // size
    assert stored_batches in (len(acked), len(acked) + 1)  # the last may have committed, unacknowledged
    for number in range(stored_batches):
        ids, vectors = batch(number, size)
        assert store.lookup("crash", ids) == ids
        hits = store.search("crash", vectors[::50], 1, None)
        assert [hit[0].id for hit in hits] == ids[::50]
        assert all(hit[0].score > 1 - TOLERANCE for hit in hits)
    # Still writable after the crash, and the new rows are found.
    ids, vectors = batch(999, 10)
    store.upsert("crash", ids, vectors, [{}] * 10)
    assert store.count("crash") == count + 10
    assert store.search("crash", vectors[:1], 1, None)[0][0].id == ids[0]


@pytest.mark.parametrize("reopen", SEARCH_KINDS, indirect=True)
def test_readers_search_while_a_writer_adds(reopen):
    store = reopen()
    store.ensure("photos", MODEL)
    ids0, vectors0 = batch(0, 100)
    store.upsert("photos", ids0, vectors0, [{}] * 100)
    done, failures = threading.Event(), []
    counts: list[list[int]] = [[], []]  # each reader's own: appends of two threads interleave in any order

    def read(seen: list[int]) -> None:
        try:
            while not done.is_set():
                seen.append(store.count("photos"))
                hits = store.search("photos", vectors0[:4], 3, None)
                assert [h[0].id for h in hits] == ids0[:4]
        except Exception as exc:  # reported below, in the test's thread
            failures.append(exc)

    readers = [threading.Thread(target=read, args=(seen,)) for seen in counts]
    for reader in readers:
        reader.start()
    for number in range(1, 16):
        ids, vectors = batch(number, 100)
        store.upsert("photos", ids, vectors, [{"batch": number}] * 100)
        # An add is visible to the next search as soon as it returns.
        assert store.search("photos", vectors[:1], 1, None)[0][0].id == ids[0]
    done.set()
    for reader in readers:
        reader.join()
    assert not failures, failures
    for seen in counts:  # a reader never sees the count go back
        assert seen and seen == sorted(seen) and seen[-1] <= 1600
    assert store.count("photos") == 1600


def test_another_process_sees_each_acknowledged_add(tmp_path):
    """The embedded store across processes: a writer process adds, this one searches the same files."""
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.library.writer", "embedded", str(tmp_path), "200"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert writer.stdout is not None
    try:
        from services.library.embedded import EmbeddedStore

        store = EmbeddedStore(tmp_path, device="cpu")
        checked = 0
        while checked < 8:
            number = int(writer.stdout.readline())
            ids, vectors = batch(number, 200)
            hits = store.search("crash", vectors[-1:], 1, None)[0]  # the batch's last row
            assert hits[0].id == ids[-1] and hits[0].score > 1 - TOLERANCE
            assert store.count("crash") >= (number + 1) * 200
            checked += 1
        store.close()
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
