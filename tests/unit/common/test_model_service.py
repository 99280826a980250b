"""Model services import at any batch size, 1 (batching off) included."""

from __future__ import annotations

import os
import subprocess
import sys

import bentoml
import pytest

from services.common.model_service import batched_api


def test_a_max_batch_size_of_1_gives_a_plain_api() -> None:
    # BentoML refuses batchable=True with max_batch_size 1 (ValueError at import).
    assert batched_api(1, 1000) is bentoml.api

    @batched_api(8, 1000)
    def batched(self, items: list[int]) -> list[int]:
        return items

    assert batched.batchable and batched.max_batch_size == 8


@pytest.mark.parametrize(
    "module,setting",
    [("services.whisper.service", "WHISPER_MAX_BATCH_SIZE"), ("services.clip.service", "CLIP_MAX_BATCH_SIZE")],
)
def test_model_services_import_with_batching_off(module: str, setting: str) -> None:
    env = {**os.environ, f"MULTIMODAL_{setting}": "1"}
    command = [sys.executable, "-c", f"import {module}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
