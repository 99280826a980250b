"""Fair scheduling of Whisper windows across requests, behind a bounded queue.

Why: BentoML's batcher takes calls first come, first served. A long recording is cut into
chunks that are all transcribed at once, so a 10-minute upload put 20 windows in the
Whisper service's queue at once, and a 3-second clip sent a moment later waited behind all
of them (and behind their re-seeks), finishing only when the long one did.

Here every request's windows wait in that request's own queue at the gateway, and at most
``max_in_flight`` windows (two batches: one forms while the other decodes) are out at the
model service at once. Each time a slot
frees, the next window comes from the next request in turn (round robin over the requests
that have a window waiting), so a short request waits for about one window per request
ahead of it in the rotation, not for every window of a long one. The model service's own
queue never holds more than those, so its order cannot undo this one.

The bound: a request is admitted with the number of windows it brings (one per chunk of
its recording) before any of them is decoded; past ``max_queued`` windows admitted and not
yet finished, it is refused (``QueueFull``), so a burst is answered at once rather than
left to time out in the queue.

Everything here runs on one event loop; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

R = TypeVar("R")
Call = Callable[[], Awaitable[Any]]


class QueueFull(Exception):
    """Admitting the request would put more windows in the queue than its bound."""


class TooManyWindows(Exception):
    """The request alone brings more windows than the whole queue may hold: no wait would help."""


class Ticket:
    """One request's place in the rotation: its waiting windows and its share of the bound."""

    def __init__(self, scheduler: WindowScheduler, windows: int) -> None:
        self._scheduler, self.windows = scheduler, windows
        self.waiting: deque[tuple[Call, asyncio.Future[Any]]] = deque()
        self.closed = False

    async def run(self, call: Callable[[], Awaitable[R]]) -> R:
        """Await ``call()`` once this request's turn comes; its result or its exception."""
        if self.closed:  # the request is over (failed or cancelled): its other chunks stop here
            raise asyncio.CancelledError
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.waiting.append((call, future))
        if len(self.waiting) == 1:  # a ticket is in the rotation exactly while it has windows waiting
            self._scheduler._turns.append(self)
        self._scheduler._dispatch()
        return await future

    def close(self) -> None:
        """Give back the request's share of the bound and drop the windows it still has waiting."""
        if self.closed:
            return
        self.closed = True
        self._scheduler.admitted -= self.windows
        for _, future in self.waiting:
            future.cancel()
        self.waiting.clear()
        if self in self._scheduler._turns:
            self._scheduler._turns.remove(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class WindowScheduler:
    """Round robin of windows over requests, at most ``max_in_flight`` out at once, ``max_queued`` admitted."""

    def __init__(self, max_in_flight: int, max_queued: int) -> None:
        if max_in_flight < 1 or max_queued < 1:
            raise ValueError("max_in_flight and max_queued must be at least 1")
        self.max_in_flight, self.max_queued = max_in_flight, max_queued
        self.admitted = 0  # windows of the requests admitted and not yet finished
        self.in_flight = 0
        self._turns: deque[Ticket] = deque()

    @property
    def waiting(self) -> int:
        return sum(len(ticket.waiting) for ticket in self._turns)

    def admit(self, windows: int) -> Ticket:
        """A ticket for a request of ``windows`` windows; ``QueueFull`` past the bound."""
        if windows > self.max_queued:
            raise TooManyWindows(f"{windows} windows, more than the queue's {self.max_queued}")
        if self.admitted + windows > self.max_queued:
            raise QueueFull(f"{self.admitted} of {self.max_queued} windows queued; this request brings {windows}")
        self.admitted += windows
        return Ticket(self, windows)

    def _dispatch(self) -> None:
        while self.in_flight < self.max_in_flight and self._turns:
            ticket = self._turns.popleft()
            call, future = ticket.waiting.popleft()
            if ticket.waiting:
                self._turns.append(ticket)  # back of the line: every other request goes first
            if future.cancelled():  # its caller gave up while it waited
                continue
            self.in_flight += 1
            task = asyncio.ensure_future(call())
            task.add_done_callback(partial(self._finished, future=future))

    def _finished(self, task: asyncio.Future[Any], future: asyncio.Future[Any]) -> None:
        self.in_flight -= 1
        if not future.done():
            if task.cancelled():
                future.cancel()
            elif task.exception() is not None:
                future.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                future.set_result(task.result())
        elif not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
        self._dispatch()
