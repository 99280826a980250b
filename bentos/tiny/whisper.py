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
    # openai-whisper allocates the decoder's positional embedding with torch.empty (published
    # checkpoints overwrite it): left as is it holds whatever memory was there, up to 1e24,
    # so logits are NaN and two generations differ. Seeded values make it a real model.
    # Default initialisation also makes a decoder that ignores its audio: the sinusoidal
    # positions swamp the small conv outputs, and flat cross-attention averages 1,500 frames
    # away, so every clip gets the same text and tests could not tell one request's audio
    # from another's. Louder convs, small token embeddings and sharper, stronger
    # cross-attention give texts (and languages) that differ from clip to clip.
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(std=0.02)
        model.decoder.token_embedding.weight.normal_(std=0.02)
        model.encoder.conv1.weight.mul_(10)
        model.encoder.conv2.weight.mul_(10)
        for block in model.decoder.blocks:
            block.cross_attn.query.weight.mul_(20)
            block.cross_attn.out.weight.mul_(20)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, out_dir / CHECKPOINT)
