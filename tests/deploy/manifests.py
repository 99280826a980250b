"""What the deploy tests share: the checked-in manifests, rendered by kustomize as a cluster gets them.

Every variant a user can apply is rendered: the base (HPA, in-process cache), each overlay,
and both components together (written to a temporary kustomization, since kustomize takes
only relative paths).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "manifests"
VARIANTS = ("base", "overlays/keda", "overlays/redis", "overlays/milvus", "keda+redis")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: the deploy tests render the manifests with `kubectl kustomize`")
    return path


def _kustomize(folder: Path) -> str:
    run = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        pytest.fail(f"kubectl kustomize {folder} failed:\n{run.stderr}")
    return run.stdout


@cache
def rendered_text(variant: str) -> str:
    if variant != "keda+redis":
        return _kustomize(MANIFESTS / variant)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.relpath(MANIFESTS, tmp)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"{root}/base"],
            "components": [f"{root}/components/keda", f"{root}/components/redis"],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return _kustomize(Path(tmp))


def rendered(variant: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(variant)) if doc]


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def named(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in of_kind(documents, kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def checked_in(path: str) -> Any:
    """A checked-in manifest file's one document."""
    documents = [doc for doc in yaml.safe_load_all((MANIFESTS / path).read_text()) if doc]
    assert len(documents) == 1, path
    return documents[0]
