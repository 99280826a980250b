"""A tiny LLaVA-1.5 in the published ``llava-hf/llava-1.5-7b-hf`` layout.

Config, safetensors weights (under the published key names), tokenizer with llava-hf's chat
template, processor and generation config: transformers' ``LlavaForConditionalGeneration`` /
``AutoProcessor`` and vLLM both load the directory as they load the published one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

IMAGE_SIZE = 32
PATCH_SIZE = 8
# CLIP prepends a CLS token; "default" feature selection drops it again, so an image costs
# (IMAGE_SIZE // PATCH_SIZE) ** 2 = 16 `<image>` tokens (576 for the published 336 / 14).
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
MAX_POSITION_EMBEDDINGS = 2048
# An upper bound: the corpus below yields 494 BPE tokens, then `<image>` is 494 and `<pad>` 495
# (appended last, as in the published vocabulary).
BPE_VOCAB_SIZE = 500
WEIGHTS = "model.safetensors"

# llava-hf/llava-1.5-*-hf's own template: "USER: <image>\n{text} ASSISTANT:". It iterates over
# content parts, so vLLM renders OpenAI-style messages (`image_url` parts) with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# BPE merges are learnt from this text so that tokens span several bytes (the detokenizer's
# real path); the byte alphabet underneath makes every other text encodable too.
_CORPUS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: The image shows a cat sitting on a red sofa.",
    "USER: Describe the picture in detail. ASSISTANT: There is a small dog running in the green grass.",
    (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    ),
    "What color is the car? How many people are there? Where was this photo taken? Is it day or night?",
    "The quick brown fox jumps over the lazy dog. 0123456789 images, photos, pictures and colours.",
]

# transformers 5.x names parameters after its module tree (`model.vision_tower.embeddings...`,
# `model.language_model...`, `lm_head`); the published checkpoints, and vLLM's loader, use the
# 4.x layout with the CLIP wrapper's `vision_model.` and the Llama wrapper's `model.` inside.
_PUBLISHED_KEYS = [
    (r"^model\.vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


def published_key(name: str) -> str:
    """The published checkpoint's name for a transformers 5.x LLaVA parameter."""
    for pattern, replacement in _PUBLISHED_KEYS:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    raise ValueError(f"no published name for LLaVA parameter {name!r}")


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Llama's special tokens: `<unk>` 0, `<s>` 1, `</s>` 2, then `<image>`, `<pad>` last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer)
    # Like Llama's tokenizer, plain encoding prepends BOS; chat prompts (vLLM, `apply_chat_template`)
    # are encoded without special tokens, exactly as with the published tokenizer.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    core.add_special_tokens([AddedToken("<image>", special=True, normalized=False), AddedToken("<pad>", special=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def generate(out_dir: Path, seed: int) -> None:
    """Write a seeded tiny LLaVA-1.5 (Llama text model, CLIP vision tower) into ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert isinstance(image_token_id, int)  # one token in, one id out
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlavaConfig(
        # head_dim 64 on both towers: vLLM's CPU attention rejects small head sizes such as 16.
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITION_EMBEDDINGS,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **special_ids,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=64,
            hidden_act="quick_gelu",
        ),
        image_token_index=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        # A PreTrainedConfig field, which LlavaConfig's dataclass fields do not list: mypy cannot see it.
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]
    )
    # float32 so transformers' and vLLM's answers on the CPU can be compared token for token.
    config.dtype = "float32"
    # Without `architectures` vLLM resolves the bare `LlavaModel` and runs it as a pooling model.
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()

    state = {published_key(name): tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    GenerationConfig(**special_ids).save_pretrained(out_dir)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, as in the published processor_config.json
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
