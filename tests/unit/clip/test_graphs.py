"""The padding that CUDA graphs need does not change an embedding.

Graphs are captured only on a GPU (the benchmark runs them there, bench/clip_gpu.py); here the
same padded buffers run eagerly (``capture=False``) on the tiny model, against the model called on
each batch at its own size.
"""

from __future__ import annotations

import bentoml
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from services.clip.encoder import ClipEncoder, EncoderOptions
from services.clip.graphs import GraphedImageTower, GraphedTextTower, batch_sizes, smallest_fitting, text_lengths

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip() -> tuple[CLIPModel, CLIPProcessor]:
    path = bentoml.models.get("tiny-clip").path
    return CLIPModel.from_pretrained(path, attn_implementation="sdpa").eval(), CLIPProcessor.from_pretrained(path)


def test_batch_sizes_are_powers_of_two_then_the_largest() -> None:
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_sizes(1) == [1]
    assert [smallest_fitting(batch_sizes(48), n) for n in (1, 3, 17, 33, 48)] == [1, 4, 32, 48, 48]


def test_text_lengths_step_by_eight_up_to_the_model_maximum() -> None:
    assert text_lengths(77) == [8, 16, 24, 32, 40, 48, 56, 64, 72, 77]
    assert text_lengths(16) == [8, 16]
    assert [smallest_fitting(text_lengths(77), n) for n in (1, 9, 46, 73)] == [8, 16, 48, 77]


@pytest.mark.parametrize("layers_per_segment", [1, 2, 3])
@torch.inference_mode()
def test_padded_image_batches_in_segments_equal_the_whole_tower_unpadded(layers_per_segment: int) -> None:
    """The tower cut into segments of layers (one graph each on a GPU), on padded batches, gives
    ``get_image_features`` on each batch at its own size; the tiny model has 2 layers, so the cases
    are: a segment per layer, one segment, and a segment longer than the tower."""
    encoder = ClipEncoder(bentoml.models.get("tiny-clip").path, CPU, EncoderOptions(cuda_graphs=False))
    model = encoder.model
    size = model.config.vision_config.image_size

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixel_values).pooler_output

    segments = encoder.image_segments(layers_per_segment)
    assert len(segments) == -(-model.config.vision_config.num_hidden_layers // layers_per_segment)
    tower = GraphedImageTower(segments, size, largest_batch=4, device=CPU, dtype=torch.float32, capture=False)
    pixels = torch.randn(11, 3, size, size, generator=torch.Generator().manual_seed(0))
    # 11 rows: parts of 4, 4 and 3 (padded to 4), after a call that left other rows in the buffers
    tower(torch.randn(4, 3, size, size))
    padded = tower(pixels)
    assert padded.shape == (11, model.config.projection_dim)
    torch.testing.assert_close(padded, forward(pixels), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_padded_text_batches_equal_unpadded(clip) -> None:
    model, processor = clip
    texts = [
        "a photo of a cat",
        "a dog",
        "three red apples on a table",
        "snow",
        "a very long description of a red bicycle leaning on a wall",
        "x",
        "two birds",
    ]

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    max_length = min(processor.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    tower = GraphedTextTower(
        forward, max_length, processor.tokenizer.pad_token_id, largest_batch=4, device=CPU, capture=False
    )
    # A first call of longer texts leaves its tokens in the buffers: the next must not see them.
    longer = processor(text=[max(texts, key=len)] * 4, return_tensors="pt", padding=True, truncation=True)
    tower(longer["input_ids"], longer["attention_mask"])
    tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    padded = tower(tokens["input_ids"], tokens["attention_mask"])
    assert padded.shape == (len(texts), model.config.projection_dim)
    # Each text alone, unpadded: what transformers' documentation computes
    for i, text in enumerate(texts):
        alone = processor(text=[text], return_tensors="pt")
        torch.testing.assert_close(
            padded[i], forward(alone["input_ids"], alone["attention_mask"])[0], atol=1e-5, rtol=1e-5
        )
