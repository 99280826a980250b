"""The continuous batcher: batches shared across callers, preparation overlapping the model, load shed."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from bentoml.exceptions import ServiceUnavailable

from services.common.continuous_batching import ContinuousBatcher

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the coroutines


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """Stages that record what they saw; ``run`` returns each item's value times ten."""

    def __init__(self, run_seconds: float = 0.0) -> None:
        self.prepared: list[list[int]] = []
        self.ran: list[list[int]] = []
        self.run_seconds = run_seconds
        self.events: list[str] = []

    def prepare(self, items: list[int]) -> list[int]:
        self.events.append(f"prepare {items}")
        self.prepared.append(items)
        return items

    def run(self, items: list[int]) -> np.ndarray:
        self.events.append(f"run {items}")
        time.sleep(self.run_seconds)
        self.ran.append(items)
        return np.array([[10 * item] for item in items], dtype=np.float32)


def batcher(recorder: Recorder, max_batch: int = 64, max_wait_seconds: float = 10.0) -> ContinuousBatcher:
    return ContinuousBatcher(
        recorder.prepare, recorder.run, max_batch=max_batch, max_wait_seconds=max_wait_seconds, name="test"
    )


async def test_each_caller_gets_its_own_rows_in_order() -> None:
    recorder = Recorder(run_seconds=0.01)
    batches = batcher(recorder)
    calls = [list(range(start, start + 3)) for start in range(0, 60, 3)]
    results = await asyncio.gather(*(batches(items) for items in calls))
    for items, rows in zip(calls, results, strict=True):
        np.testing.assert_array_equal(rows[:, 0], [10 * item for item in items])
    assert sorted(item for batch in recorder.ran for item in batch) == list(range(60))


async def test_calls_that_arrive_while_the_model_runs_share_the_next_batch() -> None:
    recorder = Recorder(run_seconds=0.2)
    batches = batcher(recorder)
    first = asyncio.ensure_future(batches([0]))
    await asyncio.sleep(0.05)  # batch [0] is on the model
    later = [asyncio.ensure_future(batches([item])) for item in range(1, 9)]
    await asyncio.gather(first, *later)
    assert recorder.ran[0] == [0]
    # Everything that arrived while [0] ran went into one batch (it was prepared during that run).
    assert sorted(recorder.ran[1]) == list(range(1, 9)), recorder.ran


async def test_a_batch_is_never_larger_than_max_batch() -> None:
    recorder = Recorder(run_seconds=0.05)
    batches = batcher(recorder, max_batch=4)
    await asyncio.gather(*(batches([item]) for item in range(20)), batches(list(range(20, 31))))
    assert max(len(batch) for batch in recorder.ran) == 4
    assert sorted(item for batch in recorder.ran for item in batch) == list(range(31))


async def test_the_next_batch_is_prepared_while_the_model_runs() -> None:
    next_prepared = threading.Event()
    overlapped: list[bool] = []

    def prepare(items: list[int]) -> list[int]:
        if items == [1]:
            next_prepared.set()
        return items

    def run(items: list[int]) -> np.ndarray:
        if items == [0]:  # holds the model until batch [1] has been prepared beside it
            overlapped.append(next_prepared.wait(timeout=5))
        return np.array([[item] for item in items], dtype=np.float32)

    batches = ContinuousBatcher(prepare, run, max_batch=8, max_wait_seconds=10, name="test")
    first = asyncio.ensure_future(batches([0]))
    await asyncio.sleep(0.05)
    await asyncio.gather(first, batches([1]))
    assert overlapped == [True]


async def test_the_model_takes_the_next_prepared_batch_while_the_event_loop_is_busy() -> None:
    """Under load a worker's event loop is busy with requests: the model thread must not wait for it
    to go from one batch to the next (only the results go back through it)."""
    prepared_second = threading.Event()
    started: dict[int, float] = {}

    def prepare(items: list[int]) -> list[int]:
        if items == [1]:
            prepared_second.set()
        return items

    def run(items: list[int]) -> np.ndarray:
        started[items[0]] = time.monotonic()
        time.sleep(0.1)
        return np.array([[item] for item in items], dtype=np.float32)

    batches = ContinuousBatcher(prepare, run, max_batch=8, max_wait_seconds=10, name="test")
    first = asyncio.ensure_future(batches([0]))
    await asyncio.sleep(0.02)  # [0] is on the model
    second = asyncio.ensure_future(batches([1]))
    await asyncio.sleep(0)
    assert await asyncio.to_thread(prepared_second.wait, 5)
    time.sleep(0.3)  # the event loop is busy: [0] ends and [1] must start meanwhile
    busy_until = time.monotonic()
    await asyncio.gather(first, second)
    assert started[1] < busy_until - 0.05, (started, busy_until)


async def test_items_that_waited_past_the_budget_are_refused_with_503() -> None:
    recorder = Recorder(run_seconds=0.3)
    batches = batcher(recorder, max_batch=1, max_wait_seconds=0.1)
    results = await asyncio.gather(*(batches([item]) for item in range(4)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, ServiceUnavailable)]
    answered = [r for r in results if isinstance(r, np.ndarray)]
    assert refused and answered, results
    assert len(refused) + len(answered) == 4


async def test_a_failing_batch_fails_only_its_callers() -> None:
    def run(items: list[int]) -> np.ndarray:
        if 13 in items:
            raise ValueError("unlucky batch")
        return np.array([[item] for item in items], dtype=np.float32)

    batches = ContinuousBatcher(lambda items: items, run, max_batch=8, max_wait_seconds=10, name="test")
    with pytest.raises(ValueError, match="unlucky"):
        await batches([13])
    np.testing.assert_array_equal(await batches([1, 2]), [[1], [2]])


async def test_a_cancelled_caller_items_are_not_prepared() -> None:
    recorder = Recorder(run_seconds=0.2)
    batches = batcher(recorder)
    first = asyncio.ensure_future(batches([0]))
    await asyncio.sleep(0.05)  # [0] on the model; the prepare stage prepares what comes next at once
    gone = asyncio.ensure_future(batches([1]))
    await asyncio.sleep(0.01)
    # [1] is being prepared already, so cancel a caller that is still queued behind it instead.
    queued = asyncio.ensure_future(batches([2]))
    await asyncio.sleep(0)
    queued.cancel()
    kept = asyncio.ensure_future(batches([3]))
    await asyncio.gather(first, gone, kept)
    assert all(2 not in batch for batch in recorder.prepared), recorder.prepared


def test_the_batcher_serves_callers_on_a_new_event_loop() -> None:
    batches = batcher(Recorder())
    for _ in range(2):  # an in-process test client may start a new loop
        rows = asyncio.run(batches([4, 5]))
        np.testing.assert_array_equal(rows[:, 0], [40, 50])


def test_callers_on_two_event_loops_at_once_are_each_served() -> None:
    """Each loop has its own stages: a second loop starting used to cancel the first one's stages
    from the wrong thread, and the first loop's callers then waited for good."""
    batches = batcher(Recorder(run_seconds=0.01))
    first_running = threading.Event()
    answers: dict[str, list[float]] = {}

    async def calls(name: str, base: int) -> None:
        for i in range(20):
            rows = await asyncio.wait_for(batches([base + i]), timeout=10)
            answers.setdefault(name, []).append(float(rows[0, 0]))
            first_running.set()

    first = threading.Thread(target=asyncio.run, args=(calls("first", 0),))
    first.start()
    assert first_running.wait(10)
    asyncio.run(calls("second", 100))  # while the first loop is still calling
    first.join(30)
    assert not first.is_alive()
    assert answers == {"first": [10.0 * i for i in range(20)], "second": [10.0 * (100 + i) for i in range(20)]}


def test_a_process_that_used_the_batcher_exits() -> None:
    """The model thread waits on its queue for good once the loop is gone: it must not hold up exit
    (a CLIP worker stopping on SIGTERM, a test run ending)."""
    import subprocess
    import sys

    script = (
        "import asyncio, numpy as np\n"
        "from services.common.continuous_batching import ContinuousBatcher\n"
        "b = ContinuousBatcher(lambda i: i, lambda i: np.array([[x] for x in i], dtype=np.float32),"
        " max_batch=4, max_wait_seconds=10, name='t')\n"
        "print(asyncio.run(b([1, 2])).tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[[1.0], [2.0]]"
