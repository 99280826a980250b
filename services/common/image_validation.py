"""Validation of client-supplied images, as encoded bytes: the entry service reads and checks them,
the model services decode their pixels.

Everything a client sends is hostile until proven otherwise: base64 is decoded with
validation, the byte size is capped, the format is restricted, and width x height is checked
from the header *before* pixels are decoded (Pillow's own decompression-bomb check only warns
below twice its limit), as is the ratio of declared pixels to encoded bytes: a few kilobytes that
declare tens of megapixels are a decompression bomb, not a photograph.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from services.common.errors import APIError

if TYPE_CHECKING:
    from configuration.settings import Settings

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,", re.ASCII)


@dataclass(frozen=True)
class EncodedImage:
    """An image as the client sent it, its header checked; its pixels are decoded where the model runs."""

    data: bytes
    sha256: str  # of the encoded bytes: the cache key's content part
    pixels: int = 0  # width x height from the header: what decoding it will cost (services/common/pixel_budget.py)
    mime: str = "application/octet-stream"  # from the content, never from what the client declared


def is_data_url(value: str) -> bool:
    return value.startswith("data:")


def is_image_data_url(value: str) -> bool:
    """Meant as an image: ``data:image/...``. Other text that starts with ``data:`` (``data: 42 is
    the answer``) is text; an image URL that is not base64 is refused later, with a reason."""
    return value.startswith("data:image/")


def decode_base64(value: str, *, param: str, max_bytes: int) -> bytes:
    """Raw base64 or a ``data:...;base64,`` URL, validated."""
    payload = value
    if is_data_url(value):
        match = _DATA_URL.match(value)
        if not match:
            raise APIError(400, "only base64 data: URLs are accepted", code="invalid_image", param=param)
        payload = value[match.end() :]
    payload = "".join(payload.split())  # tolerate line-wrapped base64
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"image is larger than {max_bytes} bytes", code="image_too_large", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image is not valid base64", code="invalid_base64", param=param) from None
    if not data:
        raise APIError(400, "image is empty", code="invalid_image", param=param)
    return data


@dataclass(frozen=True)
class BombCheck:
    """Declared pixels per encoded byte past which an image is a decompression bomb (above a size floor)."""

    max_pixels_per_byte: float
    min_pixels: int  # images this small skip the check: flat logos compress well and cost little

    def check(self, width: int, height: int, size: int, *, param: str) -> None:
        pixels = width * height
        if pixels > self.min_pixels and pixels > self.max_pixels_per_byte * size:
            raise APIError(
                413,
                f"image declares {width}x{height} pixels in {size} bytes ({pixels / size:.0f} pixels per byte; "
                f"photographs have under {self.max_pixels_per_byte:.0f}): refused as a decompression bomb",
                code="image_too_large",
                param=param,
            )


def verified_data_url(image: EncodedImage, *, param: str, max_pixels: int) -> str:
    """A ``data:`` URL of an image whose header passed, once its pixels have decoded too.

    CPU and memory (``image.pixels`` x 4 bytes): call it off the event loop and inside the request's
    pixel reservation."""
    _load(image.data, param=param, max_pixels=max_pixels)
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def _load(
    data: bytes, *, param: str, max_pixels: int, decode: bool = True, bomb_check: BombCheck | None = None
) -> Image.Image:
    """Open ``data`` and check its header; decode its pixels too unless ``decode`` is false."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise APIError(
                    413,
                    f"image is {width}x{height} pixels; at most {max_pixels} are accepted",
                    code="image_too_large",
                    param=param,
                )
            if bomb_check is not None:
                bomb_check.check(width, height, len(data), param=param)
            if decode:
                image.load()
            return image
    except APIError:
        raise
    except UnidentifiedImageError:
        raise APIError(
            400, f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})", code="invalid_image", param=param
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "image has too many pixels", code="image_too_large", param=param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise APIError(400, f"image could not be decoded: {exc}", code="invalid_image", param=param) from None


def check_image_bytes(data: bytes, *, param: str, max_pixels: int, bomb_check: BombCheck | None = None) -> EncodedImage:
    """``data`` (already decoded from base64 or fetched), its format, size and pixels per byte checked
    from the header alone."""
    image = _load(data, param=param, max_pixels=max_pixels, decode=False, bomb_check=bomb_check)
    width, height = image.size
    # Image.open(formats=...) names the format it recognised: never None here.
    mime = Image.MIME.get(image.format or "", "application/octet-stream")
    return EncodedImage(data=data, sha256=hashlib.sha256(data).hexdigest(), pixels=width * height, mime=mime)


def read_image(
    value: str, *, param: str, max_bytes: int, max_pixels: int, bomb_check: BombCheck | None = None
) -> EncodedImage:
    """Base64 to the image's bytes, its format and size checked from the header alone.

    Decoding the pixels is the model service's work (on its GPU where it has one): here it would
    cost far more than everything else the entry service does for a request. Data that passes the
    header check and still fails to decode is reported by the model service per image.
    """
    data = decode_base64(value, param=param, max_bytes=max_bytes)
    return check_image_bytes(data, param=param, max_pixels=max_pixels, bomb_check=bomb_check)


class ImageReader:
    """A client's image as every API takes it in: base64 (or fetched bytes), then the header checks,
    with the deployment's limits."""

    def __init__(self, settings: Settings) -> None:
        self.max_bytes, self.max_pixels = settings.max_image_bytes, settings.max_image_pixels
        self.bomb_check = BombCheck(settings.max_image_pixels_per_byte, settings.image_ratio_check_min_pixels)

    def read(self, value: str, param: str) -> EncodedImage:
        """Base64 or a data URL. A header check only (tens of microseconds for a photo): the pixels
        are decoded by the model service, so this may stay on the event loop."""
        return read_image(
            value, param=param, max_bytes=self.max_bytes, max_pixels=self.max_pixels, bomb_check=self.bomb_check
        )

    def check_bytes(self, data: bytes, param: str) -> EncodedImage:
        return check_image_bytes(data, param=param, max_pixels=self.max_pixels, bomb_check=self.bomb_check)
