"""A lazy cache of a model service's card (model, revision, ...): asked for on first use, then kept.

The card cannot change while the service runs, and the first requests after start-up arrive
together: one lock makes them share a single call.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

Card = TypeVar("Card")


class LazyCardCache(Generic[Card]):
    """The card of one model service, fetched by its ``describe`` API the first time it is wanted."""

    def __init__(self, service: Any) -> None:
        self._service = service  # a dependency's async proxy, with a `describe` API
        self._card: Card | None = None
        self._lock = asyncio.Lock()

    @property
    def known(self) -> Card | None:
        """The card if the service has answered before; never waits."""
        return self._card

    async def get(self) -> Card:
        if self._card is None:
            async with self._lock:
                if self._card is None:
                    self._card = await self._service.describe()
        return self._card
