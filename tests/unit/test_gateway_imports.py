"""The entry service imports a model family's heavy libraries only when it serves that family."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "whisper", "transformers", "torchvision")


def heavy_modules_imported(families: str) -> list[str]:
    code = f"import sys, services.gateway; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "MULTIMODAL_FAMILIES": families}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return [m for m in result.stdout.strip().split(",") if m]


@pytest.mark.parametrize("families", ["clip", "llava", "clip,llava"])
def test_families_without_whisper_import_no_torch_and_no_whisper(families):
    assert heavy_modules_imported(families) == []


def test_serving_whisper_imports_it():
    assert {"torch", "whisper"} <= set(heavy_modules_imported("whisper"))
