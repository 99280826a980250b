"""Fewer, larger calls from the entry service to a model-service API that batches.

Every call to a dependency service costs a round trip through two HTTP stacks and a pickle
each way. Sent one per request, that cost (not the model) limits throughput: the model
service's single event loop would handle thousands of calls a second. A coalescer merges the
items of concurrent requests in this worker into one call; the model service's batcher then
merges the calls of every worker into batches.

The image library uses the same for exact searches (``services.library.api``): concurrent queries
of one collection share one matrix product.

No timer is involved: while fewer than ``max_in_flight`` calls are out, items go at once, so a
lone request waits for nothing; under load, items queue while calls are out and the next call
takes all of them (up to ``max_items``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, cast

import numpy as np

Item = TypeVar("Item")
Row = TypeVar("Row")


class Coalescer(Generic[Item, Row]):
    def __init__(
        self, send: Callable[[list[Item]], Awaitable[Sequence[Row]]], max_items: int, max_in_flight: int = 2
    ) -> None:
        self._send, self._max_items, self._max_in_flight = send, max_items, max_in_flight
        self._waiting: list[tuple[Item, asyncio.Future[Row]]] = []
        self._in_flight = 0

    async def __call__(self, items: list[Item]) -> np.ndarray:
        """One result row per item, in order, stacked (the rows are arrays)."""
        return np.stack(cast("list[np.ndarray]", await self.each(items)))

    async def each(self, items: list[Item]) -> list[Row]:
        """One result per item, in order."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Row]] = [loop.create_future() for _ in items]
        self._waiting.extend(zip(items, futures, strict=True))
        self._dispatch()
        try:
            rows = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            # The request went away (timeout, client gone): its waiting items need no call.
            cancelled = set(map(id, futures))
            self._waiting = [(item, future) for item, future in self._waiting if id(future) not in cancelled]
            raise
        answered: list[Row] = []
        for row in rows:
            if isinstance(row, BaseException):
                raise row
            answered.append(row)
        return answered

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            taken, self._waiting = self._waiting[: self._max_items], self._waiting[self._max_items :]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._call(taken))

    async def _call(self, taken: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        try:
            rows = await self._send([item for item, _ in taken])
            if len(rows) != len(taken):  # never leave a waiter without an answer
                raise RuntimeError(f"the callee answered {len(rows)} rows for {len(taken)} items")
        except BaseException as exc:  # every waiter gets the failure; cancellation included
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), row in zip(taken, rows, strict=True):
                if not future.done():
                    future.set_result(row)
        finally:
            self._in_flight -= 1
            self._dispatch()
