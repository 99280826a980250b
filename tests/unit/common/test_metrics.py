"""The GPU gauges: family-neutral names, and the original design's names with the same values."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.common import metrics


def test_gpu_gauges_are_written_under_the_new_and_the_old_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (25, 100))
    monkeypatch.setattr(torch.cuda, "utilization", lambda: 40)
    monkeypatch.setattr(metrics, "_last_gpu_sample", float("-inf"))
    metrics.record_gpu()
    for name in ("gpu_memory_used_percent", "clip_gpu_memory_utilization_percent"):
        assert REGISTRY.get_sample_value(name, {"gpu": "0"}) == 75.0, name
    for name in ("gpu_utilization_percent", "clip_gpu_utilization_percent"):
        assert REGISTRY.get_sample_value(name, {"gpu": "0"}) == 40.0, name
