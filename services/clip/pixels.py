"""From encoded images (the client's bytes) to CLIP's pixel batch, where that scales.

Two paths, chosen by ``MULTIMODAL_CLIP_PREPROCESSING``:

- ``fast`` (default): JPEGs are decoded by torchvision on the model's device (nvJPEG, batched,
  on a GPU; libjpeg-turbo on a CPU); other formats by Pillow on a thread pool (Pillow releases
  the GIL while it decodes). Then transformers' own CLIP image processor (its torchvision
  backend: bicubic antialiased resize of the shortest edge, centre crop, normalise) runs on the
  same device, resizing images of one size together. On a GPU no pixel touches the CPU.
- ``reference``: Pillow decodes every image and the same processor runs on the CPU, the way
  transformers' documentation shows. The parity tests hold the fast path to it.

On a CPU both paths decode with libjpeg-turbo and give the same pixels. On a GPU nvJPEG's IDCT
and upsampling differ from libjpeg-turbo's by a level or two on some pixels, and resizing runs
on CUDA: on an H200 the embeddings' cosine to the reference's was at least 0.999995 (bench/RESULTS.md).

An image that cannot be decoded is left out and its index reported, so one bad image in a batch
fails only the request that sent it.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger(__name__)
Preprocessing = Literal["fast", "reference"]
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class PixelBatch:
    pixel_values: torch.Tensor  # (len(decoded), 3, size, size) on the model's device, in its dtype
    decoded: list[int]  # indices of the input images these rows belong to


def _pillow_rgb(data: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as exc:  # any decoder failure: the caller reports the image as undecodable
        log.warning("Pillow could not decode an image of %d bytes: %r", len(data), exc)
        return None


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy, as torch wants


class PixelPreprocessor:
    def __init__(
        self,
        image_processor,
        device: torch.device,
        dtype: torch.dtype,
        mode: Preprocessing,
        decode_threads: int,
    ) -> None:
        self.image_processor, self.device, self.dtype, self.mode = image_processor, device, dtype, mode
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="clip-decode")

    def __call__(self, encoded: list[bytes]) -> PixelBatch:
        images: list[Image.Image | None] | list[torch.Tensor | None]
        options: dict[str, Any]
        if self.mode == "reference":
            images = list(self._pool.map(_pillow_rgb, encoded))
            options = {}
        else:
            images = self._decode_on_device(encoded)
            options = {"device": self.device, "input_data_format": "channels_first"}
        decoded = [i for i, image in enumerate(images) if image is not None]
        if not decoded:
            return PixelBatch(torch.empty(0), decoded)
        processed = self.image_processor(images=[images[i] for i in decoded], return_tensors="pt", **options)
        return PixelBatch(processed["pixel_values"].to(self.device, self.dtype), decoded)

    def _decode_on_device(self, encoded: list[bytes]) -> list[torch.Tensor | None]:
        tensors: list[torch.Tensor | None] = [None] * len(encoded)
        jpegs = [i for i, data in enumerate(encoded) if data.startswith(JPEG_MAGIC)]
        if jpegs:
            raw = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
            self._drain_stream()
            try:
                decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as exc:
                # One bad or unsupported JPEG (CMYK, say) fails the whole batched call: decode one
                # by one, and let Pillow try what the device decoder refuses.
                log.warning("batched JPEG decoding failed (%s); decoding %d images one by one", exc, len(raw))
                decoded = [self._decode_one_jpeg(data) for data in raw]
            for i, tensor in zip(jpegs, decoded, strict=True):
                tensors[i] = tensor
        rest = [i for i, tensor in enumerate(tensors) if tensor is None]
        for i, image in zip(rest, self._pool.map(_pillow_rgb, [encoded[i] for i in rest]), strict=True):
            if image is not None:
                tensors[i] = _chw(image).to(self.device, non_blocking=True)
        return tensors

    def _drain_stream(self) -> None:
        """Wait for the work queued on this thread's stream before nvJPEG decodes on a GPU.

        nvJPEG's hardware decoder writes its output before the work already queued on the stream
        it is given has run, and its output comes from torch's caching allocator, which hands out a
        block freed on this stream as soon as it is freed: the decoder can overwrite memory that
        queued kernels (the last batch's resizing) have yet to read. That gave NaN embeddings, and
        400 "could not be decoded" for valid photographs, under load on an H200 (bench/RESULTS.md,
        runs 6 and 8; pytorch/vision#9606, meta-pytorch/torchcodec#1634). The wait is for the last
        batch's preparation kernels (a few milliseconds), on the preparation thread, not the model's."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _decode_one_jpeg(self, raw: torch.Tensor) -> torch.Tensor | None:
        self._drain_stream()
        try:
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            log.warning("the device's JPEG decoder refused an image of %d bytes (%s); Pillow tries it", len(raw), exc)
            return None
