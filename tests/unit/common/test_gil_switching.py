"""The switch-interval setting reaches the interpreter, and unset leaves Python's own."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from services.common.gil_switching import set_switch_interval


@pytest.fixture
def restored_interval() -> Iterator[float]:
    before = sys.getswitchinterval()
    yield before
    sys.setswitchinterval(before)


def test_an_interval_in_milliseconds_becomes_the_interpreter_s_in_seconds(restored_interval: float) -> None:
    set_switch_interval(0.5)
    assert sys.getswitchinterval() == pytest.approx(0.0005)


def test_unset_keeps_the_interpreter_s_interval(restored_interval: float) -> None:
    set_switch_interval(None)
    assert sys.getswitchinterval() == restored_interval
