"""CLIP model service: batchable image and text encoders.

Requests from every caller meet in BentoML's adaptive batcher, which sends one batch at a
time to ``encode_images`` / ``encode_texts`` (sizes from configuration). Embeddings come back
L2-normalised as float32, so a dot product is the cosine similarity. On a GPU the model runs
in half precision. The entry service (``services.gateway``) composes this one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import bentoml
import numpy as np
from PIL.Image import Image
from pydantic import BaseModel

from configuration.profiles import model_spec
from configuration.settings import get_settings
from services import metrics

log = logging.getLogger(__name__)
settings = get_settings()

# Bump when our preprocessing changes in a way the processor config does not show: it is part
# of every cache key, so stale embeddings are never served.
PREPROCESSING_CODE_VERSION = "1"


class ClipModelCard(BaseModel):
    """What callers need to know to cache and interpret embeddings."""

    model: str
    revision: str
    preprocessing: str
    device: str
    embedding_dim: int
    logit_scale: float  # exp of the learned temperature: softmax(scale * cosine) = CLIP's probabilities


@bentoml.service(
    name="CLIP",
    traffic={"timeout": settings.request_timeout_seconds},
    resources={"gpu": 1} if settings.device == "cuda" else {},
    # BentoML 1.4.40 replaces its client session to a dependency every 100 requests (or 5 min)
    # and closes the old one under requests still in flight, which fail ("Cannot write to
    # closing transport"; bentoml/BentoML#5540, #5544). Over a local socket there is nothing
    # to rebalance, so keep one session for the life of the process.
    runner_connection={"max_requests": 2**62, "max_age": 10.0**12},
)
class CLIP:
    model_ref = bentoml.models.BentoModel(model_spec("clip").tag)

    def __init__(self) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = torch.float16 if use_cuda else torch.float32
        path = Path(self.model_ref.path)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self.card = ClipModelCard(
            model=str(self.model_ref.tag.name),
            revision=str(self.model_ref.tag.version),
            preprocessing=self._preprocessing_version(path),
            device=str(self.device),
            embedding_dim=self.model.config.projection_dim,
            logit_scale=self.model.logit_scale.detach().exp().item(),
        )
        log.info("CLIP %s on %s (%s)", self.model_ref.tag, self.device, self.dtype)

    def _preprocessing_version(self, path: Path) -> str:
        config = b"".join(p.read_bytes() for p in sorted(path.glob("*processor_config.json")))
        digest = hashlib.sha256(config + PREPROCESSING_CODE_VERSION.encode()).hexdigest()[:12]
        return f"{digest}-{str(self.dtype).removeprefix('torch.')}"

    def _finish(self, features, kind: str, size: int, started: float) -> np.ndarray:
        import torch

        embeddings = torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
        metrics.EMBEDDING_DURATION.labels(kind).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(kind).observe(size)
        metrics.record_gpu()
        return embeddings

    @bentoml.api(batchable=True, max_batch_size=settings.clip_max_batch_size, max_latency_ms=settings.clip_max_latency_ms)
    def encode_images(self, images: list[Image]) -> np.ndarray:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return self._finish(features, "image", len(images), started)

    @bentoml.api(batchable=True, max_batch_size=settings.clip_max_batch_size, max_latency_ms=settings.clip_max_latency_ms)
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            features = self.model.get_text_features(**tokens).pooler_output
        return self._finish(features, "text", len(texts), started)

    @bentoml.api
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts as the encoder sees them (after truncation), for OpenAI's ``usage``."""
        encoded = self.processor.tokenizer(texts, truncation=True)["input_ids"]
        return [len(ids) for ids in encoded]

    @bentoml.api
    def describe(self) -> ClipModelCard:
        return self.card
