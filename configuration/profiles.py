"""Model profiles: which model each family serves, and where its weights come from.

`tiny` models have the real architectures at toy sizes with seeded random weights; they are
generated offline by ``python -m bentos.import_models``. Their answers mean nothing; they
prove that every path works and that our numbers equal the reference libraries' numbers.
`production` models are the published weights, imported where a network is.
"""

from __future__ import annotations

from pydantic import BaseModel

from configuration.families import FAMILIES, Family
from configuration.settings import Settings, get_settings


class ModelSpec(BaseModel, frozen=True):
    family: Family
    tag: str  # name in the BentoML model store
    architecture: str
    source: str  # "generated" or a Hugging Face / openai-whisper id

    @property
    def generated(self) -> bool:
        return self.source == "generated"


TINY: dict[Family, ModelSpec] = {
    "clip": ModelSpec(family="clip", tag="tiny-clip", architecture="CLIPModel", source="generated"),
    "llava": ModelSpec(
        family="llava", tag="tiny-llava", architecture="LlavaForConditionalGeneration", source="generated"
    ),
    "whisper": ModelSpec(family="whisper", tag="tiny-whisper", architecture="openai-whisper", source="generated"),
}

PRODUCTION: dict[Family, ModelSpec] = {
    "clip": ModelSpec(
        family="clip", tag="clip-vit-large-patch14", architecture="CLIPModel", source="openai/clip-vit-large-patch14"
    ),
    "llava": ModelSpec(
        family="llava",
        tag="llava-1.5-7b-hf",
        architecture="LlavaForConditionalGeneration",
        source="llava-hf/llava-1.5-7b-hf",
    ),
    "whisper": ModelSpec(family="whisper", tag="whisper-large-v3", architecture="openai-whisper", source="large-v3"),
}


def _store_name(source: str) -> str:
    return source.rsplit("/", 1)[-1].lower().replace(".", "-")


def model_spec(family: Family, settings: Settings | None = None) -> ModelSpec:
    settings = settings or get_settings()
    if settings.profile == "tiny":
        return TINY[family]
    spec = PRODUCTION[family]
    if family == "clip" and settings.clip_model:
        spec = spec.model_copy(update={"source": settings.clip_model, "tag": _store_name(settings.clip_model)})
    return spec


def profile_specs(settings: Settings | None = None) -> list[ModelSpec]:
    return [model_spec(family, settings) for family in FAMILIES]
