"""Torch's CPU pool in a CLIP worker: one thread on a GPU (the pool only spun there), torch's
default on a CPU (the model runs on it), and what the deployment configures wins either way."""

from __future__ import annotations

import pytest

from services.clip.service import torch_cpu_threads


@pytest.mark.parametrize(
    ("device_type", "configured", "expected"),
    [("cuda", None, 1), ("cpu", None, None), ("cuda", 16, 16), ("cpu", 2, 2)],
)
def test_threads_by_device_and_setting(device_type: str, configured: int | None, expected: int | None) -> None:
    assert torch_cpu_threads(device_type, configured) == expected
