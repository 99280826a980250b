"""The entry service's coalescer: concurrent requests' items share calls, and every request gets its own rows."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from services.common.coalescing import Coalescer
from services.common.errors import retry_once_on_connection_error


class RecordingModel:
    """Stands in for the CLIP service's batchable API: row i is [item, size of the call it came in]."""

    def __init__(self, delay: float = 0.01) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay

    async def __call__(self, items: list[int]) -> np.ndarray:
        self.calls.append(list(items))
        await asyncio.sleep(self.delay)
        return np.array([[item, len(items)] for item in items], dtype=np.float32)


def test_a_lone_request_is_sent_at_once_and_gets_its_rows_in_order():
    model = RecordingModel()
    rows = asyncio.run(Coalescer(model, max_items=64)([3, 1, 2]))
    assert rows[:, 0].tolist() == [3, 1, 2]
    assert model.calls == [[3, 1, 2]]


def test_concurrent_requests_share_calls_and_get_only_their_own_rows():
    model = RecordingModel()

    async def main() -> list[np.ndarray]:
        coalescer = Coalescer(model, max_items=64, max_in_flight=1)
        return await asyncio.gather(*(coalescer([10 * r + i for i in range(3)]) for r in range(20)))

    results = asyncio.run(main())
    for r, rows in enumerate(results):
        assert rows[:, 0].tolist() == [10 * r, 10 * r + 1, 10 * r + 2]
    assert len(model.calls) == 2  # the first request alone, then the 19 that queued behind it
    assert sorted(item for call in model.calls for item in call) == sorted(
        10 * r + i for r in range(20) for i in range(3)
    )


def test_calls_never_exceed_max_items():
    model = RecordingModel()

    async def main() -> None:
        coalescer = Coalescer(model, max_items=4, max_in_flight=1)
        await asyncio.gather(*(coalescer([i, i]) for i in range(10)))

    asyncio.run(main())
    assert max(len(call) for call in model.calls) <= 4
    assert sum(len(call) for call in model.calls) == 20


def test_a_failed_call_fails_its_requests_and_later_calls_still_run():
    attempts = []

    async def flaky(items: list[int]) -> np.ndarray:
        attempts.append(items)
        if len(attempts) == 1:
            raise RuntimeError("model service broke")
        return np.array([[item] for item in items], dtype=np.float32)

    async def main() -> None:
        coalescer = Coalescer(flaky, max_items=64)
        with pytest.raises(RuntimeError):
            await coalescer([1])
        assert (await coalescer([2]))[:, 0].tolist() == [2]

    asyncio.run(main())


def test_a_short_answer_fails_the_requests_instead_of_leaving_them_waiting():
    async def short(items: list[int]) -> np.ndarray:
        return np.zeros((len(items) - 1, 1), dtype=np.float32)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="rows for"):
            await asyncio.wait_for(Coalescer(short, max_items=64)([1, 2, 3]), timeout=5)

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_queue_and_the_others_are_answered():
    model = RecordingModel(delay=0.05)

    async def main() -> None:
        coalescer = Coalescer(model, max_items=64, max_in_flight=1)
        first = asyncio.create_task(coalescer([1]))
        await asyncio.sleep(0.01)  # the first call is out; the next two requests queue
        doomed = asyncio.create_task(coalescer([2]))
        kept = asyncio.create_task(coalescer([3]))
        await asyncio.sleep(0)
        doomed.cancel()
        assert (await first)[:, 0].tolist() == [1] and (await kept)[:, 0].tolist() == [3]

    asyncio.run(main())
    assert model.calls == [[1], [3]]


def test_a_connection_error_is_retried_once_then_raised():
    attempts = []

    async def broken(items: list[int]) -> np.ndarray:
        attempts.append(items)
        raise httpx.WriteError("broken pipe")

    async def recovering(items: list[int]) -> np.ndarray:
        attempts.append(items)
        if len(attempts) == 1:
            raise BrokenPipeError()
        return np.zeros((len(items), 1), dtype=np.float32)

    with pytest.raises(httpx.WriteError):
        asyncio.run(retry_once_on_connection_error(broken)([1]))
    assert len(attempts) == 2
    attempts.clear()
    assert asyncio.run(retry_once_on_connection_error(recovering)([1, 2])).shape == (2, 1)
    assert len(attempts) == 2


def test_a_timeout_is_not_retried():
    attempts = []

    async def slow(items: list[int]) -> np.ndarray:
        attempts.append(items)
        raise httpx.ReadTimeout("no answer")

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(retry_once_on_connection_error(slow)([1]))
    assert len(attempts) == 1
