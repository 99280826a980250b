"""The CLIP service's decoding and preprocessing on a CPU: every image mode becomes RGB pixels,
both paths give the same pixels, and an image that does not decode is left out, not fatal."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from services.clip.pixels import PixelPreprocessor
from tests.helpers import jpeg_bytes, png_bytes, random_image

SIZE = 32


def preprocessor(mode: str) -> PixelPreprocessor:
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return PixelPreprocessor(processor, torch.device("cpu"), torch.float32, mode, decode_threads=2)  # type: ignore[arg-type]


def gif_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("P").save(buffer, "GIF")
    return buffer.getvalue()


IMAGES = {
    "RGBA png": png_bytes(Image.new("RGBA", (40, 30), (10, 200, 30, 128))),
    "palette png": png_bytes(random_image(1).convert("P")),
    "grey png": png_bytes(random_image(2).convert("L")),
    "truncated png": png_bytes(random_image(3))[:200],
    "grey jpeg": jpeg_bytes(random_image(4, (80, 60)).convert("L")),
    "jpeg": jpeg_bytes(random_image(5, (64, 48))),
    "truncated jpeg": jpeg_bytes(random_image(6, (640, 480)))[:3000],
    "gif": gif_bytes(random_image(7)),
}


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_every_mode_becomes_rgb_and_bad_images_are_left_out(mode):
    batch = preprocessor(mode)(list(IMAGES.values()))
    names = list(IMAGES)
    assert [names[i] for i in batch.decoded] == [n for n in names if not n.startswith("truncated")]
    assert batch.pixel_values.shape == (len(batch.decoded), 3, SIZE, SIZE)
    assert torch.isfinite(batch.pixel_values).all()


def test_both_paths_give_the_same_pixels_on_a_cpu():
    encoded = list(IMAGES.values())
    fast, reference = preprocessor("fast")(encoded), preprocessor("reference")(encoded)
    assert fast.decoded == reference.decoded
    torch.testing.assert_close(fast.pixel_values, reference.pixel_values, rtol=0, atol=1e-6)


def test_nothing_decodable_is_an_empty_batch():
    batch = preprocessor("fast")([IMAGES["truncated png"], b"\xff\xd8\xff not a jpeg"])
    assert batch.decoded == [] and batch.pixel_values.numel() == 0
