"""checkov finds no failed check in any variant a user can apply; every skip says why.

checkov conflicts with the project's pinned packages, so it lives in its own virtualenv
(`make tools`: .venv-tools/, pinned in deploy/requirements-tools.txt). Skips are annotations
on the objects themselves (``checkov.io/skipN: CHECK=reason``), so a reader of the manifest
sees them, and this test accepts only the ones listed here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import REPO, VARIANTS, rendered, rendered_text

CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
ALLOWED_SKIPS = {
    "CKV_K8S_43",  # image digest: set at deploy time (the image is built after the manifests)
    "CKV_K8S_40",  # uid >= 10000: BentoML's and Redis's images run as their own users (1034, 999)
}


def checkov(path: Path) -> dict:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: `make tools` installs checkov into its own virtualenv")
    run = subprocess.run(
        [
            str(CHECKOV),
            "--framework",
            "kubernetes",
            "--file",
            str(path),
            "--output",
            "json",
            "--skip-download",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=path.parent,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(path.parent),
            "BC_SKIP_MAPPING": "TRUE",
            "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
        },
    )
    if not run.stdout.strip().startswith("{"):
        pytest.fail(f"checkov gave no report (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(run.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkov_finds_no_failed_check(variant: str, tmp_path: Path):
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered_text(variant))
    report = checkov(manifest)
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)
    summary = report["summary"]
    assert summary["passed"] > 100 and summary["parsing_errors"] == 0
    skipped = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} <= ALLOWED_SKIPS
    assert all(len(c["check_result"]["suppress_comment"]) > 40 for c in skipped), "each skip gives its reason"


def test_every_workload_carries_its_skip_reasons():
    for doc in rendered("keda+redis"):
        if doc["kind"] != "Deployment":
            continue
        annotations = doc["metadata"]["annotations"]
        skips = dict(value.split("=", 1) for key, value in annotations.items() if key.startswith("checkov.io/skip"))
        assert set(skips) == ALLOWED_SKIPS, doc["metadata"]["name"]


def test_checkov_would_catch_a_weakened_pod(tmp_path: Path):
    """The harness above can fail: a privileged, writable, root-capable container is reported."""
    documents = rendered("base")
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True, "readOnlyRootFilesystem": False}
    manifest = tmp_path / "weakened.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    failed = {c["check_id"] for c in checkov(manifest)["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_22", "CKV_K8S_20"} <= failed
