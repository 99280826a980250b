"""The service's batch tokenizer gives what CLIPProcessor gives, ids and mask, on every kind of text."""

from __future__ import annotations

import bentoml
import pytest
import torch
from transformers import CLIPProcessor

from services.clip.tokens import BatchTokenizer

TEXTS = [
    "a photo of a cat",
    "",
    "x",
    "Ünïcödé: café, naïve, 東京の写真, emoji 🐈‍⬛ and tabs\tand\nnewlines",
    "a very long description " * 40,  # beyond the model's 77 tokens: truncated, end-of-text kept
    "   leading and trailing spaces   ",
    "UPPER case, punctuation!?; numbers 1234567890",
]


@pytest.fixture(scope="module")
def processor() -> CLIPProcessor:
    return CLIPProcessor.from_pretrained(bentoml.models.get("tiny-clip").path)


@pytest.mark.parametrize("count", [1, len(TEXTS), 150])  # one text; one chunk; several chunks on threads
def test_batch_tokenizer_equals_the_processor(processor: CLIPProcessor, count: int) -> None:
    texts = [TEXTS[i % len(TEXTS)] + ("" if i < len(TEXTS) else f" {i}") for i in range(count)]
    tokenizer = BatchTokenizer(processor.tokenizer, processor.tokenizer.model_max_length, chunk=64)
    ids, mask = tokenizer(texts)
    expected = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    assert ids.dtype == mask.dtype == torch.int64
    torch.testing.assert_close(ids, expected["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(mask, expected["attention_mask"], rtol=0, atol=0)
    if count > 1:
        assert ids.shape[1] == processor.tokenizer.model_max_length  # the long text was truncated, not dropped
