"""Start-up objects leave the collector's scans; later garbage is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common.garbage_collection import freeze_start_up_objects


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session scans everything again


def test_objects_alive_at_start_up_are_frozen(unfrozen_after: None) -> None:
    loaded = [object() for _ in range(1000)]
    before = gc.get_freeze_count()
    freeze_start_up_objects()
    assert gc.get_freeze_count() >= before + len(loaded)


def test_cycles_made_after_start_up_are_still_collected(unfrozen_after: None) -> None:
    freeze_start_up_objects()
    first, second = Node(), Node()
    first.other, second.other = second, first  # a cycle: only the cyclic collector frees it
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None


def test_the_setting_turns_it_off(unfrozen_after: None) -> None:
    before = gc.get_freeze_count()
    freeze_start_up_objects(enabled=False)
    assert gc.get_freeze_count() == before
