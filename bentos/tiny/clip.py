"""A tiny CLIP in the published ``openai/clip-vit-*`` layout (config, weights, tokenizer, processor)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 32
CONTEXT_LENGTH = 77


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
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab=_byte_level_vocabulary(), merges=[], model_max_length=CONTEXT_LENGTH)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
