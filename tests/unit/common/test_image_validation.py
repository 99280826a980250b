"""Safe image reading: every kind of hostile input becomes a 4xx APIError.

The entry service checks base64, size and the image header (``read_image``); pixels are decoded
by the CLIP service, which reports images that fail there (tests/integration/test_clip_api.py).
"""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from services.common.errors import APIError
from services.common.image_validation import decode_base64, read_image
from tests.helpers import b64, data_url, png_bytes, png_header_only, random_image

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}


def test_raw_base64_and_data_url_read_to_the_same_bytes():
    data = png_bytes(random_image(0))
    raw, url = read_image(b64(data), param="p", **LIMITS), read_image(data_url(data), param="p", **LIMITS)
    assert raw.sha256 == url.sha256 == hashlib.sha256(data).hexdigest()
    assert raw.data == url.data == data


def test_line_wrapped_base64_is_accepted():
    data = png_bytes(random_image(1))
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    assert decode_base64(wrapped, param="p", max_bytes=LIMITS["max_bytes"]) == data


@pytest.mark.parametrize(
    "value,status,code",
    [
        ("not base64!", 400, "invalid_base64"),
        ("", 400, "invalid_image"),
        ("data:image/png,notbase64", 400, "invalid_image"),
        (b64(b"plain text, not an image"), 400, "invalid_image"),
        (b64(png_header_only(20_000, 20_000)), 413, "image_too_large"),
        (b64(png_header_only(1_001, 1_000)), 413, "image_too_large"),
        (b64(b"\x00" * 2_000_000), 413, "image_too_large"),
    ],
    ids=["invalid", "empty", "non-base64 data url", "non-image", "bomb header", "over pixel cap", "over byte cap"],
)
def test_hostile_inputs_are_client_errors(value, status, code):
    with pytest.raises(APIError) as raised:
        read_image(value, param="image_data", **LIMITS)
    assert (raised.value.status, raised.value.code, raised.value.param) == (status, code, "image_data")


def test_a_truncated_image_passes_the_header_check():
    # Its pixels fail where they are decoded (tests/unit/clip/test_pixels.py).
    truncated = png_bytes(random_image(2))[:200]
    assert read_image(b64(truncated), param="p", **LIMITS).data == truncated


def test_formats_outside_the_allow_list_are_refused():
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    with pytest.raises(APIError) as raised:
        read_image(b64(buffer.getvalue()), param="p", **LIMITS)
    assert (raised.value.status, raised.value.code) == (400, "invalid_image")
