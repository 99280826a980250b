"""Published Whisper checkpoints align words with their published heads, loaded from a file as the service does."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from bentos.import_models import model_metadata
from configuration.profiles import TINY, ModelSpec, model_spec
from configuration.settings import Settings
from services.whisper.alignment_heads import ALIGNMENT_HEADS_KEY, set_stored_alignment_heads

# openai-whisper's `tiny` decoder shape (4 layers of 6 heads), which its published heads need;
# the widths are shrunk (6 heads of 4) so that the random checkpoint is small.
TINY_DECODER = ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=24,
    n_audio_head=6,
    n_audio_layer=4,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=24,
    n_text_head=6,
    n_text_layer=4,
)
PUBLISHED_TINY = ModelSpec(family="whisper", tag="whisper-tiny", architecture="openai-whisper", source="tiny")


def heads(model: Whisper) -> torch.Tensor:
    return model.alignment_heads.to_dense()


def published_heads(name: str, dims: ModelDimensions) -> torch.Tensor:
    reference = Whisper(dims)
    reference.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    return heads(reference)


def default_heads(dims: ModelDimensions) -> torch.Tensor:
    """openai-whisper's default: every head of the last half of the decoder layers."""
    mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    mask[dims.n_text_layer // 2 :] = True
    return mask


def checkpoint_file(folder: Path, dims: ModelDimensions) -> str:
    """A random checkpoint in openai-whisper's file format, as the model store holds it."""
    torch.manual_seed(0)
    path = folder / "model.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, path)
    return str(path)


def test_a_published_checkpoint_loaded_from_a_file_gets_its_published_heads(tmp_path):
    metadata = model_metadata(PUBLISHED_TINY)
    model = whisper.load_model(checkpoint_file(tmp_path, TINY_DECODER), device="cpu")
    assert torch.equal(heads(model), default_heads(TINY_DECODER)), "load_model of a file keeps the default"

    assert set_stored_alignment_heads(model, metadata)
    assert torch.equal(heads(model), published_heads("tiny", TINY_DECODER))
    assert not torch.equal(heads(model), default_heads(TINY_DECODER))


def test_the_production_whisper_stores_its_published_heads():
    spec = model_spec("whisper", Settings(profile="production"))
    stored = model_metadata(spec)[ALIGNMENT_HEADS_KEY]
    assert stored.encode("ascii") == whisper._ALIGNMENT_HEADS[spec.source]


def test_a_generated_whisper_keeps_the_default_heads(tmp_path):
    metadata = model_metadata(TINY["whisper"])
    assert ALIGNMENT_HEADS_KEY not in metadata
    model = whisper.load_model(checkpoint_file(tmp_path, TINY_DECODER), device="cpu")
    assert not set_stored_alignment_heads(model, metadata)
    assert torch.equal(heads(model), default_heads(TINY_DECODER))


def test_heads_of_another_shape_fail_at_load(tmp_path):
    model = whisper.load_model(checkpoint_file(tmp_path, TINY_DECODER), device="cpu")
    with pytest.raises(RuntimeError):
        set_stored_alignment_heads(model, model_metadata(model_spec("whisper", Settings(profile="production"))))


def test_a_published_name_without_heads_is_refused_before_any_download():
    unknown = PUBLISHED_TINY.model_copy(update={"source": "no-such-whisper"})
    with pytest.raises(ValueError, match="no alignment heads"):
        model_metadata(unknown)
