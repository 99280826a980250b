"""A tiny multilingual Whisper checkpoint in openai-whisper's own file format."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

CHECKPOINT = "model.pt"


def generate(out_dir: Path, seed: int) -> None:
    import torch
    from whisper.model import ModelDimensions, Whisper

    # n_vocab 51865 makes it multilingual, so the tokenizer that ships inside the package
    # applies and language detection, translation and timestamps all take their real paths.
    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=2,
    )
    torch.manual_seed(seed)
    model = Whisper(dims)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, out_dir / CHECKPOINT)
