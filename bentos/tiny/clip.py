"""A tiny CLIP in the published ``openai/clip-vit-*`` layout (config, weights, tokenizer, processor).

``generate_shaped`` writes the published ViT-B/32 and ViT-L/14 architectures at their real
sizes with random weights, for benchmarks on machines with no hub (bench/clip_gpu.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGE_SIZE = 32
CONTEXT_LENGTH = 77

# The published models' shapes (openai/clip-vit-*/config.json): text tower, vision tower, projection.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
        projection_dim=32,
        image_size=IMAGE_SIZE,
    ),
    "vit-b-32": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
        ),
        projection_dim=512,
        image_size=224,
    ),
    "vit-l-14": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
        ),
        projection_dim=768,
        image_size=224,
    ),
}


def _byte_level_vocabulary() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: every byte is a token, so every text tokenizes.

    The published vocabulary cannot be downloaded here; a byte-level one keeps CLIPTokenizer's
    real code path (lower-casing, byte mapping, ``</w>`` word ends, special tokens last).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def generate(out_dir: Path, seed: int) -> None:
    generate_shaped(out_dir, seed, "tiny")


def generate_shaped(out_dir: Path, seed: int, shape: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    dims = SHAPES[shape]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab=_byte_level_vocabulary(), merges=[], model_max_length=CONTEXT_LENGTH)
    size = dims["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            **dims["text"],
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        ),
        vision_config=dict(**dims["vision"], image_size=size),
        projection_dim=dims["projection_dim"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
