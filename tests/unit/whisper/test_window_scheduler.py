"""The Whisper window scheduler without servers: round-robin order, the in-flight cap, the bound."""

from __future__ import annotations

import asyncio

import pytest

from services.whisper.window_scheduler import QueueFull, TooManyWindows, WindowScheduler


class Model:
    """Stands in for the Whisper service: records the order windows reach it, and how many at once."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.running = self.most_running = 0

    def window(self, label: str, fail: bool = False):
        async def call() -> str:
            self.order.append(label)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            await asyncio.sleep(0.001)
            self.running -= 1
            if fail:
                raise RuntimeError(f"{label} failed")
            return f"decoded {label}"

        return call


async def submit_all(scheduler: WindowScheduler, model: Model, requests: dict[str, int]) -> list[str]:
    """Every request's windows submitted at once (as a request's chunk threads do), in request order."""
    tickets = {name: scheduler.admit(count) for name, count in requests.items()}
    calls = [
        tickets[name].run(model.window(f"{name}{i}")) for name, count in requests.items() for i in range(1, count + 1)
    ]
    results = await asyncio.gather(*calls)
    for ticket in tickets.values():
        ticket.close()
    return list(results)


def test_windows_are_taken_from_requests_in_turn():
    scheduler, model = WindowScheduler(max_in_flight=1, max_queued=100), Model()
    results = asyncio.run(submit_all(scheduler, model, {"long": 6, "short": 2, "other": 1}))
    # First come first served would be long1..long6, short1, short2, other1. long1 went out
    # before the others had arrived; after it, each request gets one window per turn.
    assert model.order == ["long1", "long2", "short1", "other1", "long3", "short2", "long4", "long5", "long6"]
    # Each caller gets its own window's result, whatever the order they were decoded in.
    assert results == [
        f"decoded {name}{i}" for name, count in [("long", 6), ("short", 2), ("other", 1)] for i in range(1, count + 1)
    ]
    assert scheduler.admitted == 0 and scheduler.in_flight == 0 and scheduler.waiting == 0


def test_a_request_arriving_later_goes_next():
    async def scenario() -> list[str]:
        scheduler, model = WindowScheduler(max_in_flight=2, max_queued=100), Model()
        long = scheduler.admit(8)
        long_windows = [asyncio.create_task(long.run(model.window(f"long{i}"))) for i in range(1, 9)]
        while len(model.order) < 2:  # the long request's first batch is out
            await asyncio.sleep(0)
        with scheduler.admit(1) as short:
            await short.run(model.window("short1"))
            done_when_short_finished = sum(task.done() for task in long_windows)
        await asyncio.gather(*long_windows)
        long.close()
        assert model.most_running == 2
        # The short window went out with the next free slot, not after the long request's 6 waiting windows.
        assert model.order.index("short1") <= 3, model.order
        assert done_when_short_finished < 8
        return model.order

    order = asyncio.run(scenario())
    assert sorted(order) == sorted([f"long{i}" for i in range(1, 9)] + ["short1"])


def test_no_more_than_max_in_flight_reach_the_model():
    scheduler, model = WindowScheduler(max_in_flight=3, max_queued=100), Model()
    asyncio.run(submit_all(scheduler, model, {"a": 10, "b": 7, "c": 4}))
    assert model.most_running == 3 and len(model.order) == 21


def test_admission_is_bounded_by_windows_queued():
    scheduler = WindowScheduler(max_in_flight=2, max_queued=10)
    first, second = scheduler.admit(7), scheduler.admit(3)
    with pytest.raises(QueueFull):
        scheduler.admit(1)
    first.close()
    first.close()  # closing twice gives the windows back once
    assert scheduler.admitted == 3
    scheduler.admit(7)
    with pytest.raises(QueueFull):
        scheduler.admit(1)
    second.close()
    with pytest.raises(TooManyWindows):  # could never be admitted, even into an empty queue
        scheduler.admit(11)


def test_a_failed_window_fails_its_caller_and_frees_its_slot():
    async def scenario() -> None:
        scheduler, model = WindowScheduler(max_in_flight=1, max_queued=10), Model()
        with scheduler.admit(1) as ticket, pytest.raises(RuntimeError, match="bad1 failed"):
            await ticket.run(model.window("bad1", fail=True))
        with scheduler.admit(1) as ticket:
            assert await ticket.run(model.window("good1")) == "decoded good1"
        assert scheduler.in_flight == 0

    asyncio.run(scenario())


def test_a_closed_request_loses_its_waiting_windows_and_others_go_on():
    async def scenario() -> list[str]:
        scheduler, model = WindowScheduler(max_in_flight=1, max_queued=10), Model()
        gone, staying = scheduler.admit(4), scheduler.admit(2)
        gone_windows = [asyncio.create_task(gone.run(model.window(f"gone{i}"))) for i in range(1, 5)]
        staying_windows = [asyncio.create_task(staying.run(model.window(f"staying{i}"))) for i in range(1, 3)]
        while not model.order:
            await asyncio.sleep(0)
        gone.close()  # the client went away while gone1 was decoding
        assert await asyncio.gather(*staying_windows) == ["decoded staying1", "decoded staying2"]
        outcomes = await asyncio.gather(*gone_windows, return_exceptions=True)
        assert outcomes[0] == "decoded gone1"
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[1:])
        with pytest.raises(asyncio.CancelledError):  # a chunk still running sends nothing more
            await gone.run(model.window("gone5"))
        assert scheduler.admitted == 2
        return model.order

    assert asyncio.run(scenario()) == ["gone1", "staying1", "staying2"]
