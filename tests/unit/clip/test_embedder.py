"""A rolling update of the CLIP service under a shared cache: vectors are keyed on the model that
made them, and one answer never mixes two models (P5, defect 9).

The CLIP service here is a stand-in: staging two model revisions behind one running entry service
would take two CLIP deployments. It answers the way the real one does (``with_fingerprint`` rows,
``describe`` a card); the cache is the real in-process one.
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from configuration.settings import Settings
from services.clip.cache import InProcessCache, ModelVersion
from services.clip.embedder import ClipEmbedder
from services.clip.protocol import ClipModelCard, with_fingerprint
from services.common.errors import APIError


def card(revision: str, dim: int) -> ClipModelCard:
    return ClipModelCard(
        model="clip", revision=revision, preprocessing="p", device="cpu", embedding_dim=dim, logit_scale=100.0
    )


class StandInClip:
    """Answers as the model of ``self.card``; switching it is the rolling update."""

    def __init__(self, current: ClipModelCard) -> None:
        self.card, self.to_async, self.describes = current, self, 0

    async def describe(self) -> ClipModelCard:
        self.describes += 1
        return self.card

    async def encode_texts(self, texts: list[str]) -> np.ndarray:
        dim = self.card.embedding_dim
        seeds = [int(hashlib.sha256(f"{self.card.revision}{t}".encode()).hexdigest()[:8], 16) for t in texts]
        vectors = np.stack([np.random.default_rng(seed).standard_normal(dim) for seed in seeds]).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = np.hstack([vectors, np.full((len(texts), 1), 3.0, dtype=np.float32)])  # token counts
        return with_fingerprint(rows, self.card.fingerprint)


def key(of: ClipModelCard, text: str) -> str:
    return ModelVersion(of.model, of.revision, of.preprocessing).key("text", hashlib.sha256(text.encode()).hexdigest())


def test_vectors_of_a_new_model_are_not_stored_under_the_old_cards_keys_nor_mixed() -> None:
    old, new = card("1", dim=4), card("2", dim=6)
    clip, cache = StandInClip(old), InProcessCache(max_entries=100)
    embedder = ClipEmbedder(clip, cache, Settings())

    async def scenario() -> None:
        vectors, counts = await embedder.embed_texts(["a cat"])
        assert vectors.shape == (1, 4) and counts.tolist() == [3]
        clip.card = new  # the CLIP service now runs another model; the entry service's card is old

        # "a cat" is cached under the old model; "a dog" would come from the new one: refused, not mixed.
        with pytest.raises(APIError) as refused:
            await embedder.embed_texts(["a cat", "a dog"])
        assert (refused.value.status, refused.value.code) == (503, "model_changed")
        assert (await cache.get_many([key(old, "a dog")])) == [None]

        # The retry asks for the card again and gets the new model's vectors, of its own size.
        vectors, _ = await embedder.embed_texts(["a cat", "a dog"])
        assert vectors.shape == (2, 6) and clip.describes == 2
        stored = await cache.get_many([key(new, "a cat"), key(new, "a dog")])
        np.testing.assert_allclose(np.stack(stored)[:, :-1], vectors)  # stored rows keep the token count
        old_cat = (await cache.get_many([key(old, "a cat")]))[0]
        assert old_cat is not None and old_cat.shape == (5,)  # the old model's vector is untouched

    asyncio.run(scenario())


def test_the_fingerprint_survives_a_float32_column() -> None:
    fingerprint = card("0123abcd", dim=768).fingerprint
    assert 0 <= fingerprint < 2**24
    assert int(with_fingerprint(np.zeros((2, 3), dtype=np.float32), fingerprint)[1, -1]) == fingerprint
