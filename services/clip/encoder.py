"""CLIP's encoders as plain Python: what the CLIP service runs, with no service around it.

Kept apart from the BentoML service so that the benchmark measures the service's own encoding
code in-process (bench/clip_gpu.py), and so that the service module stays about serving.

On a GPU:
- the towers run as CUDA graphs (``services.clip.graphs``), so a batch costs one launch;
- images go through in chunks, prepared (decoded, resized, normalised) by a thread of their own
  on a CUDA stream of their own, so that chunk k+1 can be prepared while the model runs on
  chunk k. Measured in-process on an H200 (bench/RESULTS.md, runs 4 and 5), this gained nothing
  over one thread and stream: preparation finds no host sync to hide, its cost is GPU time
  (nvJPEG, resizing photographs) that competes with the model's.
On a CPU the towers run eagerly on each batch as it comes.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor

from services.clip.graphs import GraphedImageTower, GraphedTextTower
from services.clip.pixels import PixelBatch, PixelPreprocessor, Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderOptions:
    preprocessing: Preprocessing = "fast"
    decode_threads: int = 4
    largest_batch: int = 64  # the largest batch the towers are captured for; larger ones run in parts
    cuda_graphs: bool = True  # on a GPU only
    # Images per chunk of the prepare/model pipeline; 32 measured best of 16, 32 and 64 (run 5).
    chunk: int = 32


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
        self.pixels = PixelPreprocessor(
            self.processor.image_processor, device, self.dtype, options.preprocessing, options.decode_threads
        )
        self.embedding_dim: int = self.model.config.projection_dim
        self.logit_scale: float = self.model.logit_scale.detach().exp().item()
        self.graphs = options.cuda_graphs and device.type == "cuda"
        if device.type == "cuda":
            self._prepare_stream = torch.cuda.Stream(device)
            self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix="clip-prepare")
        self.image_tower, self.text_tower = self._image_features, self._text_features
        if self.graphs:
            self.image_tower = GraphedImageTower(
                self._image_features,
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
                options.largest_batch,
                device,
                capture=True,
            )

    def _max_text_length(self) -> int:
        return min(self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    @torch.inference_mode()
    def encode_images(self, images: list[bytes]) -> np.ndarray:
        """L2-normalised float32 embeddings of encoded images; a row of NaN where one does not decode."""
        embeddings = np.full((len(images), self.embedding_dim), np.nan, dtype=np.float32)
        if self.device.type != "cuda":  # a CPU gains nothing from chunks: one call per batch, as it came
            batch = self.pixels(images)
            if batch.decoded:
                embeddings[batch.decoded] = normalised(self.image_tower(batch.pixel_values)).numpy()
            return embeddings
        starts = range(0, len(images), self.options.chunk)
        rows: list[int] = []
        features: list[torch.Tensor] = []
        model_stream = torch.cuda.current_stream()
        next_chunk = self._prepare_thread.submit(self._prepare, images[: self.options.chunk])
        for start in starts:
            batch, prepared = next_chunk.result()
            if start + self.options.chunk < len(images):  # prepared while the model runs on this chunk
                following = images[start + self.options.chunk : start + 2 * self.options.chunk]
                next_chunk = self._prepare_thread.submit(self._prepare, following)
            if batch.decoded:
                model_stream.wait_event(prepared)
                batch.pixel_values.record_stream(model_stream)  # made on the other stream, used on this one
                features.append(normalised(self.image_tower(batch.pixel_values)))
                rows.extend(start + i for i in batch.decoded)
        if rows:
            embeddings[rows] = torch.cat(features).cpu().numpy()  # the one wait for the model
            _warn_if_not_finite(embeddings, rows)
        return embeddings

    def _prepare(self, images: list[bytes]) -> tuple[PixelBatch, torch.cuda.Event]:
        """Pixels of a chunk, made on the preparation stream, and the event that marks them ready."""
        with torch.inference_mode(), torch.cuda.stream(self._prepare_stream):
            batch = self.pixels(images)
            prepared = torch.cuda.Event()
            prepared.record(self._prepare_stream)
        return batch, prepared

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """One row per text: its L2-normalised embedding, then its token count (OpenAI's ``usage``)."""
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        features = normalised(self.text_tower(ids, mask))
        counts = mask.sum(dim=1, keepdim=True).float()
        return torch.cat([features, counts], dim=1).cpu().numpy()
