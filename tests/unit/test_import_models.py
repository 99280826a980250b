"""The model import command, run as users run it, into a throwaway model store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bentos.tiny.whisper import CHECKPOINT
from tests.conftest import BIN, REPO


def run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)


def model_info(tag: str, home: Path) -> dict:
    return json.loads(run([str(BIN / "bentoml"), "models", "get", tag, "-o", "json"], home).stdout)


def digest(folder: Path) -> dict[str, str]:
    """Every file's sha256 but BentoML's own record (model.yaml: version, creation time)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != "model.yaml"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("family,tag", [("clip", "tiny-clip"), ("whisper", "tiny-whisper"), ("llava", "tiny-llava")])
def test_tiny_models_are_labelled_deterministic_and_show_progress(tmp_path, family, tag):
    first, second = tmp_path / "a", tmp_path / "b"
    imported = run([sys.executable, "-m", "bentos.import_models", "--family", family], first)
    run([sys.executable, "-m", "bentos.import_models", "--family", family], second)

    assert "importing tiny models" in imported.stderr  # the progress bar
    info = model_info(tag, first)
    assert info["labels"] == {"profile": "tiny", "family": family, "architecture": info["labels"]["architecture"]}
    assert info["metadata"] == {"source": "generated", "seed": 0}
    files = [digest(home / "models" / tag / model_info(tag, home)["version"]) for home in (first, second)]
    assert files[0] == files[1] and files[0], "the same seed must give the same files"


def test_a_model_already_in_the_store_is_kept_unless_forced(tmp_path):
    run([sys.executable, "-m", "bentos.import_models", "--family", "clip"], tmp_path)
    version = model_info("tiny-clip", tmp_path)["version"]
    again = run([sys.executable, "-m", "bentos.import_models", "--family", "clip"], tmp_path)
    assert "already in the model store" in again.stderr
    assert model_info("tiny-clip", tmp_path)["version"] == version
    run([sys.executable, "-m", "bentos.import_models", "--family", "clip", "--force"], tmp_path)
    assert model_info("tiny-clip", tmp_path)["version"] != version


def test_an_imported_model_is_returned_as_stored(tmp_path):
    # bentoml.models.create's own object points at its temporary folder, gone once it is saved.
    code = (
        "from bentos.import_models import import_model; from configuration.profiles import TINY; "
        "print(import_model(TINY['whisper'], 'tiny').path)"
    )
    path = Path(run([sys.executable, "-c", code], tmp_path).stdout.splitlines()[-1])
    assert path.is_relative_to(tmp_path / "models"), path
    assert (path / CHECKPOINT).is_file()
