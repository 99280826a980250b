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


def test_objects_alive_at_start_up_leave_the_collector_s_scans(unfrozen_after: None) -> None:
    loaded = [Node() for _ in range(1000)]  # tracked by the collector, as a model's objects are
    assert all(gc.is_tracked(node) for node in loaded)
    freeze_start_up_objects()
    scanned = {id(o) for o in gc.get_objects()}  # what collections walk: frozen objects are not in it
    assert not any(id(node) in scanned for node in loaded)


def test_cycles_made_after_start_up_are_still_collected_automatically(unfrozen_after: None) -> None:
    freeze_start_up_objects()
    assert gc.isenabled()
    gone = []
    for _ in range(100_000):  # enough allocations for the collector to run on its own
        first, second = Node(), Node()
        first.other, second.other = second, first  # a cycle: only the cyclic collector frees it
        gone.append(weakref.ref(first))
        del first, second
    assert sum(ref() is None for ref in gone) > 90_000


def test_the_setting_turns_it_off(unfrozen_after: None) -> None:
    before = gc.get_freeze_count()
    freeze_start_up_objects(enabled=False)
    assert gc.get_freeze_count() == before
