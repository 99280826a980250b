"""CLIP's encoders as plain Python: what the CLIP service runs, with no service around it.

Kept apart from the BentoML service so that the benchmark measures the service's own encoding
code in-process (bench/clip_gpu.py), and so that the service module stays about serving.

Each kind of input has two stages, which the service runs on two threads so that they overlap
on consecutive batches (``services.common.continuous_batching``):
- ``prepare_images`` / ``prepare_texts``: from the client's bytes or strings to the model's inputs
  (decoding, resizing, normalising; tokenising). On a GPU images are prepared on a CUDA stream of
  their own, and an event marks when their pixels are ready;
- ``embed_images`` / ``embed_texts``: the model, on the GPU's main stream once the pixels are ready.
On a GPU the towers run as CUDA graphs (``services.clip.graphs``), so a batch costs one launch (the
image tower a few: one per segment of ``LAYERS_PER_GRAPH`` layers, so that nvJPEG never waits
behind a whole batch); on a CPU they run eagerly. ``encode_images`` / ``encode_texts`` run both stages in sequence.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor

from services.clip.graphs import GraphedImageTower, GraphedTextTower
from services.clip.pixels import PixelBatch, PixelPreprocessor, Preprocessing
from services.clip.tokens import BatchTokenizer

log = logging.getLogger(__name__)
# Transformer layers per graph of the image tower: 3 is 3.6 ms of ViT-L/14 at batch 64 on an H200.
LAYERS_PER_GRAPH = 3


@dataclass(frozen=True)
class PreparedImages:
    count: int  # images asked for, decoded or not
    pixels: PixelBatch
    ready: torch.cuda.Event | None  # recorded on the preparation stream after the pixels; None on a CPU


@dataclass(frozen=True)
class PreparedTexts:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class EncoderOptions:
    preprocessing: Preprocessing = "fast"
    decode_threads: int = 4
    largest_batch: int = 64  # the largest image batch the tower is captured for; larger ones run in parts
    largest_text_batch: int = 256  # the same for texts
    cuda_graphs: bool = True  # on a GPU only
    # On a GPU, run the towers on a stream of their own rather than the legacy default stream,
    # which would wait for (and hold up) any work that nvJPEG or a copy puts on it.
    model_stream: bool = True


def _warn_if_not_finite(embeddings: np.ndarray, decoded: list[int]) -> None:
    """A decoded image whose embedding is not finite reaches the client as "could not be decoded"
    (NaN is that sentinel): say so in the log, where it can be told apart."""
    bad = [i for i in decoded if not np.isfinite(embeddings[i]).all()]
    if bad:
        log.warning("%d decoded images of a batch of %d have non-finite embeddings: %s", len(bad), len(embeddings), bad)


def normalised(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


class ClipEncoder:
    def __init__(self, path: Path, device: torch.device, options: EncoderOptions = EncoderOptions()) -> None:
        self.device, self.options = device, options
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        # transformers declares .to with functools.wraps(Module.to), which mypy reads as an unbound method.
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa").to(device).eval()  # type: ignore[arg-type]
        self.processor = CLIPProcessor.from_pretrained(path)
        self.tokenizer = BatchTokenizer(self.processor.tokenizer, self._max_text_length())
        self.pixels = PixelPreprocessor(
            self.processor.image_processor, device, self.dtype, options.preprocessing, options.decode_threads
        )
        self.embedding_dim: int = self.model.config.projection_dim
        self.logit_scale: float = self.model.logit_scale.detach().exp().item()
        self.graphs = options.cuda_graphs and device.type == "cuda"
        # Images are prepared on a stream of their own, so their kernels can overlap the model's.
        self._prepare_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._model_stream = torch.cuda.Stream(device) if device.type == "cuda" and options.model_stream else None
        self.image_tower, self.text_tower = self._image_features, self._text_features
        if self.graphs:
            self.image_tower = GraphedImageTower(
                self.image_segments(LAYERS_PER_GRAPH),
                self.model.config.vision_config.image_size,
                options.largest_batch,
                device,
                self.dtype,
                capture=True,
            )
            self.text_tower = GraphedTextTower(
                self._text_features,
                self._max_text_length(),
                self.processor.tokenizer.pad_token_id,
                options.largest_text_batch,
                device,
                capture=True,
            )

    def _max_text_length(self) -> int:
        return min(self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def image_segments(self, layers_per_segment: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """``_image_features`` as consecutive functions of a few transformer layers each, the first
        taking pixels, the last giving the projected features: what ``get_image_features`` runs."""
        vision = self.model.vision_model
        layers = list(vision.encoder.layers)

        def segment(first: int) -> Callable[[torch.Tensor], torch.Tensor]:
            last = first + layers_per_segment

            def forward(hidden: torch.Tensor) -> torch.Tensor:
                if first == 0:
                    hidden = vision.pre_layrnorm(vision.embeddings(hidden))
                for layer in layers[first:last]:
                    hidden = layer(hidden, None)
                if last >= len(layers):
                    hidden = self.model.visual_projection(vision.post_layernorm(hidden[:, 0, :]))
                return hidden

            return forward

        return [segment(first) for first in range(0, len(layers), layers_per_segment)]

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def prepare_images(self, images: list[bytes]) -> PreparedImages:
        """Pixels of encoded images; on a GPU made on the preparation stream, with the event that marks them ready."""
        if self._prepare_stream is None:
            with torch.inference_mode():
                return PreparedImages(len(images), self.pixels(images), None)
        with torch.inference_mode(), torch.cuda.stream(self._prepare_stream):
            batch = self.pixels(images)
            ready = torch.cuda.Event()
            ready.record(self._prepare_stream)
        return PreparedImages(len(images), batch, ready)

    def _on_model_stream(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self._model_stream) if self._model_stream else contextlib.nullcontext()

    @torch.inference_mode()
    def embed_images(self, prepared: PreparedImages) -> np.ndarray:
        """L2-normalised float32 embeddings; a row of NaN where an image did not decode."""
        with self._on_model_stream():
            return self._embed_images(prepared)

    def _embed_images(self, prepared: PreparedImages) -> np.ndarray:
        embeddings = np.full((prepared.count, self.embedding_dim), np.nan, dtype=np.float32)
        batch = prepared.pixels
        if not batch.decoded:
            return embeddings
        if prepared.ready is not None:
            model_stream = torch.cuda.current_stream(self.device)
            model_stream.wait_event(prepared.ready)
            batch.pixel_values.record_stream(model_stream)  # made on the other stream, used on this one
        embeddings[batch.decoded] = normalised(self.image_tower(batch.pixel_values)).cpu().numpy()
        _warn_if_not_finite(embeddings, batch.decoded)
        return embeddings

    def encode_images(self, images: list[bytes]) -> np.ndarray:
        return self.embed_images(self.prepare_images(images))

    def prepare_texts(self, texts: list[str]) -> PreparedTexts:
        """Token ids and attention masks, on the CPU: the tokenizer's work is the preparation."""
        return PreparedTexts(*self.tokenizer(texts))

    @torch.inference_mode()
    def embed_texts(self, prepared: PreparedTexts) -> np.ndarray:
        """One row per text: its L2-normalised embedding, then its token count (OpenAI's ``usage``)."""
        with self._on_model_stream():
            return self._embed_texts(prepared)

    def _embed_texts(self, prepared: PreparedTexts) -> np.ndarray:
        ids, mask = prepared.input_ids.to(self.device), prepared.attention_mask.to(self.device)
        features = normalised(self.text_tower(ids, mask))
        counts = prepared.attention_mask.sum(dim=1, keepdim=True).float()
        return torch.cat([features.cpu(), counts], dim=1).numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.embed_texts(self.prepare_texts(texts))
