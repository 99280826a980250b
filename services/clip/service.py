"""CLIP model service: the image and text encoders, batched continuously across callers.

Calls from every entry-service worker meet in one continuous batcher per kind
(``services.common.continuous_batching``): while the model runs one batch on the GPU, the next
is prepared on another thread (images decoded and resized, texts tokenised) from everything that
arrived meanwhile, up to the max batch size. Images arrive as the client's encoded bytes;
``services.clip.encoder`` decodes, preprocesses and encodes them, on the GPU where there is one (in
half precision, with SDPA attention and CUDA graphs). Embeddings come back L2-normalised as
float32, so a dot product is the cosine similarity. The entry service (``services.gateway``)
composes this one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from configuration.profiles import model_spec
from configuration.settings import get_settings
from services.clip.protocol import ClipModelCard, with_fingerprint
from services.common import metrics
from services.common.continuous_batching import ContinuousBatcher
from services.common.device import torch_device
from services.common.garbage_collection import freeze_start_up_objects
from services.common.model_service import model_service
from services.common.own_listening_socket import listen_on_own_socket_when_ready
from services.common.shutdown_grace import keep_serving_while_callers_drain

log = logging.getLogger(__name__)
settings = get_settings()

# Bump when our preprocessing or the cached rows' layout changes in a way the processor config
# does not show: it is part of every cache key, so stale embeddings are never served.
PREPROCESSING_CODE_VERSION = "2"


def torch_cpu_threads(device_type: str, configured: int | None) -> int | None:
    """Threads for torch's CPU pool in a CLIP worker; None keeps torch's default (one per core).

    On a GPU the CPU runs only small tensor ops (token counts, joining rows), yet a few passed
    torch's parallel threshold and woke its pool: 16 threads per worker on a 16-core host, which
    spun 6 cores per CLIP worker for 64-text requests (bench/RESULTS.md, runs 12-13)."""
    if configured is not None:
        return configured
    return 1 if device_type == "cuda" else None


@model_service("CLIP", workers=settings.clip_workers)
class CLIP:
    model_ref = bentoml.models.BentoModel(model_spec("clip").tag)

    def __init__(self) -> None:
        # torch and transformers: only in this service's process
        import torch

        from services.clip.encoder import ClipEncoder, EncoderOptions

        # Tokenising a batch of short texts takes a millisecond or two on one thread; spread over
        # every core by tokenizers' thread pool, each batch woke all of them (6 cores per CLIP
        # worker for 64-text requests on a 16-core GPU host, bench/RESULTS.md run 10), cores the
        # entry service's HTTP work needs. One thread, unless the deployment says otherwise.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        keep_serving_while_callers_drain()  # a /search's calls span a SIGTERM: services/common/shutdown_grace.py
        device = torch_device()
        if (threads := torch_cpu_threads(device.type, settings.clip_cpu_threads)) is not None:
            torch.set_num_threads(threads)
        path = Path(self.model_ref.path)
        options = EncoderOptions(
            preprocessing=settings.clip_preprocessing,
            decode_threads=settings.clip_decode_threads,
            largest_batch=settings.clip_max_batch_size,
            largest_text_batch=settings.clip_max_text_batch_size,
            cuda_graphs=settings.clip_cuda_graphs,
        )
        self.encoder = ClipEncoder(path, device, options)
        self.card = ClipModelCard(
            model=str(self.model_ref.tag.name),
            revision=str(self.model_ref.tag.version),
            preprocessing=self._preprocessing_version(path, settings.clip_preprocessing),
            device=str(device),
            embedding_dim=self.encoder.embedding_dim,
            logit_scale=self.encoder.logit_scale,
        )
        self.image_batches = self._batcher(
            "image", self.encoder.prepare_images, self.encoder.embed_images, settings.clip_max_batch_size
        )
        self.text_batches = self._batcher(
            "text", self.encoder.prepare_texts, self.encoder.embed_texts, settings.clip_max_text_batch_size
        )
        log.info(
            "CLIP %s on %s (%s, %s preprocessing, CUDA graphs %s)",
            self.model_ref.tag,
            device,
            self.encoder.dtype,
            settings.clip_preprocessing,
            "on" if self.encoder.graphs else "off",
        )
        freeze_start_up_objects(settings.freeze_start_up_objects)  # common/garbage_collection.py
        listen_on_own_socket_when_ready()  # loaded: take connections (services/common/own_listening_socket.py)

    def _preprocessing_version(self, path: Path, mode: str) -> str:
        config = b"".join(p.read_bytes() for p in sorted(path.glob("*processor_config.json")))
        digest = hashlib.sha256(config + PREPROCESSING_CODE_VERSION.encode()).hexdigest()[:12]
        dtype = str(self.encoder.dtype).removeprefix("torch.")
        return f"{digest}-{mode}-{self.encoder.device.type}-{dtype}"

    @bentoml.api
    async def encode_images(self, images: list[bytes]) -> np.ndarray:
        """Embeddings of encoded images (as the client sent them); a row of NaN where one does not decode.
        Each row ends with the model's fingerprint (``ClipModelCard.fingerprint``)."""
        return with_fingerprint(await self.image_batches(images), self.card.fingerprint)

    @bentoml.api
    async def encode_texts(self, texts: list[str]) -> np.ndarray:
        """One row per text: its embedding, its token count as the encoder saw it (OpenAI's ``usage``),
        then the model's fingerprint."""
        return with_fingerprint(await self.text_batches(texts), self.card.fingerprint)

    def _batcher(
        self, kind: str, prepare: Callable[[list[Any]], Any], embed: Callable[[Any], np.ndarray], max_batch: int
    ):
        def run(prepared: Any) -> np.ndarray:
            started = time.perf_counter()
            rows = embed(prepared)
            self._observe(kind, len(rows), started)
            return rows

        return ContinuousBatcher(
            prepare,
            run,
            max_batch=max_batch,
            max_wait_seconds=settings.clip_max_latency_ms / 1000,
            name=f"clip-{kind}",
        )

    @staticmethod
    def _observe(kind: str, size: int, started: float) -> None:
        metrics.EMBEDDING_DURATION.labels(kind).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(kind).observe(size)
        metrics.record_gpu()

    @bentoml.api
    def describe(self) -> ClipModelCard:
        return self.card
