"""A lazy cache of a model service's card (model, revision, ...): asked for on first use, then kept.

A card does not change while one model service runs, and the first requests after start-up arrive
together: one lock makes them share a single call. A caller that learns the service behind it has
changed (a rolling update) forgets the card, and the next use asks again.
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

    def forget(self, stale: Card) -> None:
        """Drop the card if it is still ``stale`` (another caller may have fetched a newer one)."""
        if self._card is stale:
            self._card = None
