"""The cross-attention heads Whisper aligns words with (``whisper.timing.find_alignment``).

openai-whisper publishes, for each released checkpoint, the decoder heads whose cross-attention
follows the audio (``whisper._ALIGNMENT_HEADS``), but ``whisper.load_model`` sets them only when
it is given a model *name*. The service loads a checkpoint *file* from the model store, which
would leave the default: every head of the last half of the decoder layers, and wrong word
timings. So ``bentos.import_models`` stores the published heads in the model's metadata, and
the service sets them from there after loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import whisper
from whisper.model import Whisper

# Metadata key of the BentoML model: openai-whisper's base85 string (gzip of a bool mask of
# n_text_layer x n_text_head), as text, since model metadata holds no bytes.
ALIGNMENT_HEADS_KEY = "alignment_heads"


def published_alignment_heads(name: str) -> str | None:
    """openai-whisper's published alignment heads of a checkpoint name ("large-v3"), if any."""
    heads: bytes | None = whisper._ALIGNMENT_HEADS.get(name)
    return heads.decode("ascii") if heads is not None else None


def set_stored_alignment_heads(model: Whisper, metadata: Mapping[str, Any]) -> bool:
    """Set the alignment heads stored in a model's metadata; False (the default heads) if none are.

    A checkpoint whose shape does not match the stored heads fails here, not at the first request.
    """
    heads = metadata.get(ALIGNMENT_HEADS_KEY)
    if heads is None:
        return False
    model.set_alignment_heads(str(heads).encode("ascii"))
    return True
