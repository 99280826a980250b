"""Test inputs and the reference implementation the service is checked against."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cached_property

import bentoml
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# Real photographs that scikit-image's wheel ships (astronaut, cat, coffee, rocket, ...): JPEGs of
# photographs decode, resize and compress like users' images; random noise does not.
PHOTOGRAPHS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")


def photograph(name: str) -> Image.Image:
    from importlib.resources import files

    with Image.open(files("skimage") / "data" / name) as image:
        return image.copy()


def jpeg_bytes(image: Image.Image, size: tuple[int, int] | None = None, **options) -> bytes:
    """``image`` as a JPEG (resized to ``size`` first where given), as a camera or a browser would send it."""
    if size is not None:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=options.pop("quality", 90), **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def image_chat(url: str, text: str = "What is shown in this image?") -> list[dict]:
    """OpenAI chat messages: one user turn with an image and a question."""
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def chat_body(url: str, text: str = "What is shown in this image?", max_tokens: int = 4) -> dict:
    """A /v1/chat/completions body for the tiny LLaVA."""
    return {"model": "tiny-llava", "max_tokens": max_tokens, "messages": image_chat(url, text)}


def metric_samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric_value(text: str, name: str, **labels: str) -> float:
    return sum(metric_samples(text, name, **labels))


class ReferenceClip:
    """transformers' CLIPModel on the same weights, used the way its documentation shows."""

    def __init__(self, tag: str = "tiny-clip") -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = bentoml.models.get(tag).path
        self.model = CLIPModel.from_pretrained(path).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    def forward(self, image: Image.Image, texts: list[str]):
        import torch

        inputs = self.processor(text=texts, images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            return self.model(**inputs)

    def similarities(self, image: Image.Image, texts: list[str]) -> np.ndarray:
        out = self.forward(image, texts)
        return (out.logits_per_image[0] / self.model.logit_scale.exp()).detach().numpy()

    def probabilities(self, image: Image.Image, texts: list[str]) -> np.ndarray:
        return self.forward(image, texts).logits_per_image[0].softmax(-1).detach().numpy()

    def image_embedding(self, image: Image.Image) -> np.ndarray:
        return self.forward(image, ["x"]).image_embeds[0].detach().numpy()

    def encoded_image_embedding(self, data: bytes) -> np.ndarray:
        """Of an encoded image, decoded by Pillow, as transformers' documentation does it."""
        with Image.open(io.BytesIO(data)) as image:
            return self.image_embedding(image.convert("RGB"))

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.processor.tokenizer(texts, truncation=True)["input_ids"]]

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        return self.forward(Image.new("RGB", (32, 32)), texts).text_embeds.detach().numpy()

    @cached_property
    def model_name(self) -> str:
        return bentoml.models.get("tiny-clip").tag.name


def wav_bytes(samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> bytes:
    """``samples`` as a WAV file (``subtype`` "FLOAT" keeps NaN and infinity as they are)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def palette_png(width: int, height: int, noisy_rows: int = 0, seed: int = 0) -> bytes:
    """A palette PNG declaring width x height pixels: one colour (a decompression bomb of a few KB) or,
    with ``noisy_rows`` rows of random palette indices, as large as the caller needs (each such row
    ``width`` bytes that do not compress), so it passes the pixels-per-byte check."""
    rng = np.random.default_rng(seed)
    noisy = set(np.linspace(0, height - 1, noisy_rows, dtype=int).tolist()) if noisy_rows else set()
    compressor = zlib.compressobj(9)
    blank = b"\x00" + bytes(width)  # filter byte, then one palette index per pixel
    parts = [
        compressor.compress(b"\x00" + rng.integers(0, 4, width, dtype=np.uint8).tobytes() if y in noisy else blank)
        for y in range(height)
    ]
    pixels = b"".join(parts) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    palette = b"\xff\x00\x00\x00\xff\x00\x00\x00\xff\xff\xff\xff"
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", palette)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )
