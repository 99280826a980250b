"""Concurrent searches of one collection merged into one matrix product.

Exact search reads every vector of a collection once per product: on a GPU a million float16
rows take about as long to multiply by 64 queries as by one (the read, not the arithmetic, is the
cost), and on a CPU the float16-to-float32 conversion is shared the same way. So, as
``services.common.coalescing`` does for model calls, queries that arrive while a search runs wait
and go together in the next one; a lone query waits for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

Result = TypeVar("Result")


class QueryBatcher(Generic[Result]):
    """Calls ``search(queries)`` (in a thread: it blocks) with every query waiting, at most
    ``max_queries`` at a time and ``max_in_flight`` calls at once; each caller gets its own row."""

    def __init__(
        self, search: Callable[[np.ndarray], list[Result]], max_queries: int = 64, max_in_flight: int = 1
    ) -> None:
        self._search, self._max_queries, self._max_in_flight = search, max_queries, max_in_flight
        self._waiting: list[tuple[np.ndarray, asyncio.Future[Result]]] = []
        self._in_flight = 0

    async def __call__(self, query: np.ndarray) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((query, future))
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self._waiting = [(q, f) for q, f in self._waiting if f is not future]
            raise

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            taken, self._waiting = self._waiting[: self._max_queries], self._waiting[self._max_queries :]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._run(taken))

    async def _run(self, taken: list[tuple[np.ndarray, asyncio.Future[Result]]]) -> None:
        try:
            results = await asyncio.to_thread(self._search, np.stack([query for query, _ in taken]))
        except Exception as exc:  # every waiter gets the failure (an APIError keeps its status)
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(taken, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._dispatch()
