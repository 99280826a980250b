"""CLIP's models: the public API's requests and responses, and what the CLIP service answers the
entry service (its card, its text rows). Pydantic and numpy only: importing this never imports torch."""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.common.schemas import StrictRequest

# Native routes (the original design's shapes)


class SearchRequest(StrictRequest):
    image_data: str = Field(min_length=1, description="The image, base64 (raw or a data: URL).")
    texts: list[str] = Field(min_length=1, description="Candidate texts to rank against the image.")
    return_embeddings: bool = False


class SearchEmbeddings(BaseModel):
    """The original design's keys, which its clients read."""

    image_embedding: list[float]
    text_embeddings: list[list[float]]


class SearchResponse(BaseModel):
    similarities: list[float] = Field(description="Cosine similarity of the image to each text, in input order.")
    best_match: str
    best_similarity: float
    embeddings: SearchEmbeddings | None = None


class ClassifyRequest(StrictRequest):
    image_data: str = Field(min_length=1, description="The image, base64 (raw or a data: URL).")
    labels: list[str] = Field(min_length=1, description="Candidate class names.")
    template: str = Field("a photo of a {}", description="Prompt each label is put into; `{}` marks the label.")


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    predictions: list[LabelProbability] = Field(description="Softmax over CLIP's scaled logits, most likely first.")
    best_label: str
    best_probability: float


# OpenAI-compatible embeddings


class EmbeddingsRequest(StrictRequest):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields we do not use

    input: str | list[str] = Field(description="Texts, or images as base64 `data:image/...` URLs.")
    model: str = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# Between the entry service and the CLIP service


class ClipModelCard(BaseModel):
    """What callers need to know to cache and interpret embeddings."""

    model: str
    revision: str
    preprocessing: str
    device: str
    embedding_dim: int
    logit_scale: float  # exp of the learned temperature: softmax(scale * cosine) = CLIP's probabilities

    @cached_property  # asked for on every CLIP call, on both sides of it
    def fingerprint(self) -> int:
        """What encoded a vector, as a number that a float32 column holds exactly (24 bits): the CLIP
        service appends it to every row it returns, so the entry service can tell when the model
        behind its cached card has changed (a rolling update under a shared cache)."""
        identity = f"{self.model}|{self.revision}|{self.preprocessing}|{self.embedding_dim}".encode()
        return int.from_bytes(hashlib.sha256(identity).digest()[:3], "big")


def with_fingerprint(rows: np.ndarray, fingerprint: int) -> np.ndarray:
    """The CLIP service's answer: each row followed by the fingerprint of the model that made it."""
    return np.hstack([rows, np.full((len(rows), 1), fingerprint, dtype=rows.dtype)])


def split_fingerprint(rows: np.ndarray) -> tuple[np.ndarray, set[int]]:
    """The rows without their fingerprint column, and the fingerprints found in it."""
    return rows[:, :-1], {int(value) for value in np.unique(rows[:, -1])}


def split_text_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``encode_texts`` rows are the embedding followed by the text's token count: split them."""
    return rows[:, :-1], rows[:, -1].astype(np.int64)
