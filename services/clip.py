"""CLIP model service: batchable image and text encoders.

Requests from every caller meet in BentoML's adaptive batcher, which sends one batch at a
time to ``encode_images`` / ``encode_texts`` (sizes from configuration). Images arrive as the
client's encoded bytes and are decoded and preprocessed here, on the GPU where there is one
(``services.clip_pixels``). Embeddings come back L2-normalised as float32, so a dot product is
the cosine similarity. On a GPU the model runs in half precision with SDPA attention. The entry
service (``services.gateway``) composes this one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel

from configuration.profiles import model_spec
from configuration.settings import get_settings
from services import metrics

log = logging.getLogger(__name__)
settings = get_settings()

# Bump when our preprocessing or the cached rows' layout changes in a way the processor config
# does not show: it is part of every cache key, so stale embeddings are never served.
PREPROCESSING_CODE_VERSION = "2"


def split_text_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``encode_texts`` rows are the embedding followed by the text's token count: split them."""
    return rows[:, :-1], rows[:, -1].astype(np.int64)


class ClipModelCard(BaseModel):
    """What callers need to know to cache and interpret embeddings."""

    model: str
    revision: str
    preprocessing: str
    device: str
    embedding_dim: int
    logit_scale: float  # exp of the learned temperature: softmax(scale * cosine) = CLIP's probabilities


# Adaptive batching of the encoders. BentoML needs a max batch size above 1; at 1 (batching off,
# to measure what batching is worth) the encoders are plain APIs and the entry service sends one
# item per call.
if settings.clip_max_batch_size > 1:
    encoder_api = bentoml.api(
        batchable=True, max_batch_size=settings.clip_max_batch_size, max_latency_ms=settings.clip_max_latency_ms
    )
else:
    encoder_api = bentoml.api


@bentoml.service(
    name="CLIP",
    workers=settings.clip_workers,
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

        from services.clip_pixels import PixelPreprocessor  # torch: only in this service's process

        use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = torch.float16 if use_cuda else torch.float32
        path = Path(self.model_ref.path)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa").to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self.pixels = PixelPreprocessor(
            self.processor.image_processor,
            self.device,
            self.dtype,
            settings.clip_preprocessing,
            decode_threads=settings.clip_decode_threads,
        )
        self.card = ClipModelCard(
            model=str(self.model_ref.tag.name),
            revision=str(self.model_ref.tag.version),
            preprocessing=self._preprocessing_version(path, settings.clip_preprocessing),
            device=str(self.device),
            embedding_dim=self.model.config.projection_dim,
            logit_scale=self.model.logit_scale.detach().exp().item(),
        )
        log.info("CLIP %s on %s (%s, %s preprocessing)", self.model_ref.tag, self.device, self.dtype, settings.clip_preprocessing)

    def _preprocessing_version(self, path: Path, mode: str) -> str:
        config = b"".join(p.read_bytes() for p in sorted(path.glob("*processor_config.json")))
        digest = hashlib.sha256(config + PREPROCESSING_CODE_VERSION.encode()).hexdigest()[:12]
        return f"{digest}-{mode}-{self.device.type}-{str(self.dtype).removeprefix('torch.')}"

    def _finish(self, features, kind: str, size: int, started: float) -> np.ndarray:
        import torch

        embeddings = torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
        metrics.EMBEDDING_DURATION.labels(kind).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(kind).observe(size)
        metrics.record_gpu()
        return embeddings

    @encoder_api
    def encode_images(self, images: list[bytes]) -> np.ndarray:
        """Embeddings of encoded images (as the client sent them); a row of NaN where one does not decode."""
        import torch

        started = time.perf_counter()
        embeddings = np.full((len(images), self.card.embedding_dim), np.nan, dtype=np.float32)
        with torch.inference_mode():
            batch = self.pixels(images)
            if batch.decoded:
                features = self.model.get_image_features(pixel_values=batch.pixel_values).pooler_output
                embeddings[batch.decoded] = self._normalised(features)
        self._observe("image", len(images), started)
        return embeddings

    @encoder_api
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """One row per text: its embedding, then its token count as the encoder saw it (OpenAI's ``usage``)."""
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            features = self.model.get_text_features(**tokens).pooler_output
            counts = tokens["attention_mask"].sum(dim=1, keepdim=True).float().cpu().numpy()
        rows = np.concatenate([self._normalised(features), counts], axis=1)
        self._observe("text", len(texts), started)
        return rows

    @staticmethod
    def _normalised(features) -> np.ndarray:
        import torch

        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    @staticmethod
    def _observe(kind: str, size: int, started: float) -> None:
        metrics.EMBEDDING_DURATION.labels(kind).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(kind).observe(size)
        metrics.record_gpu()

    @bentoml.api
    def describe(self) -> ClipModelCard:
        return self.card
