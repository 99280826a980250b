"""Put the profile's models into the BentoML model store.

    python -m bentos.import_models                      # the profile from MULTIMODAL_PROFILE (tiny)
    python -m bentos.import_models --profile production --family clip

`tiny` models are generated offline from a seed; `production` models are the published
weights, downloaded where there is a network. Either way the files land in the store in the
layout the services load, with labels (profile, family, architecture) to find them by.
A model already in the store is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
from tqdm import tqdm

from configuration.families import FAMILIES, Family
from configuration.profiles import ModelSpec, profile_specs
from configuration.settings import Settings

log = logging.getLogger("bentos.import_models")
DEFAULT_SEED = 0


def _tiny_generator(family: Family) -> Callable[[Path, int], None]:
    if family == "clip":
        from bentos.tiny.clip import generate
    elif family == "whisper":
        from bentos.tiny.whisper import generate
    else:
        from bentos.tiny.llava import generate
    return generate


def _download(spec: ModelSpec, out_dir: Path) -> None:
    """Published weights, saved in the same layout as the tiny generators write."""
    if spec.family == "whisper":
        import whisper

        from bentos.tiny.whisper import CHECKPOINT

        # openai-whisper downloads its checkpoints itself (checksummed) by size name.
        path = whisper._download(whisper._MODELS[spec.source], str(out_dir), in_memory=False)
        Path(path).rename(out_dir / CHECKPOINT)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(
            spec.source,
            local_dir=out_dir,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        )


def model_metadata(spec: ModelSpec, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """What the store records with a model: its source and, for a published Whisper, its alignment heads."""
    if spec.generated:
        # A generated Whisper has no published alignment heads: it keeps openai-whisper's
        # default (every head of the last half of the decoder layers), so none are recorded.
        return {"source": spec.source, "seed": seed}
    metadata: dict[str, Any] = {"source": spec.source}
    if spec.family == "whisper":
        from services.whisper.alignment_heads import ALIGNMENT_HEADS_KEY, published_alignment_heads

        # whisper.load_model sets these only for a model name; the service loads a file.
        heads = published_alignment_heads(spec.source)
        if heads is None:
            raise ValueError(f"openai-whisper publishes no alignment heads for {spec.source!r}")
        metadata[ALIGNMENT_HEADS_KEY] = heads
    return metadata


def import_model(spec: ModelSpec, profile: str, seed: int = DEFAULT_SEED, force: bool = False) -> bentoml.Model:
    if not force:
        try:
            existing = bentoml.models.get(spec.tag)
            log.info("%s is already in the model store as %s", spec.family, existing.tag)
            return existing
        except bentoml.exceptions.NotFound:
            pass
    metadata = model_metadata(spec, seed)  # before a download: a model it cannot describe fails at once
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if spec.generated:
            _tiny_generator(spec.family)(work, seed)
        else:
            _download(spec, work)
        labels = {"profile": profile, "family": spec.family, "architecture": spec.architecture}
        with bentoml.models.create(spec.tag, labels=labels, metadata=metadata) as model:
            shutil.copytree(work, model.path, dirs_exist_ok=True)
    log.info("imported %s as %s", spec.family, model.tag)
    # `model` still points at create's temporary folder, removed once the store has its copy.
    return bentoml.models.get(model.tag)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "production"], default=None)
    parser.add_argument("--family", choices=FAMILIES, action="append")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="re-import models already in the store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    settings = Settings(profile=args.profile) if args.profile else Settings()
    specs = [s for s in profile_specs(settings) if not args.family or s.family in args.family]
    for spec in (progress := tqdm(specs, desc=f"importing {settings.profile} models", unit="model")):
        progress.set_postfix_str(spec.tag)
        import_model(spec, settings.profile, seed=args.seed, force=args.force)


if __name__ == "__main__":
    main()
