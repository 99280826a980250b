"""Budgets of decoded pixels: per request (413) and in flight per process (429).

Pixels, not bytes, are what an image costs once decoded (3-4 bytes each, several times that while
a model service resizes them), and a few kilobytes of PNG can declare tens of megapixels. The entry
service reads every image's width x height from its header before anything is decoded, so it can
refuse a request whose images add up to more than one request may ask for (413: retrying cannot
help), and admit a request only while the pixels it has already sent on to CLIP or vLLM and not yet
had answered leave room for it (429 with Retry-After: retrying later can).

The in-flight count is per entry-service worker process: with ``MULTIMODAL_GATEWAY_WORKERS`` of
them, the model services may hold that many budgets' worth at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.common import metrics
from services.common.errors import APIError


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


class PixelBudget:
    """Decoded pixels this process has admitted and not yet released."""

    def __init__(self, max_request_pixels: int, max_pixels_in_flight: int) -> None:
        if max_request_pixels > max_pixels_in_flight:
            raise ValueError("a request's budget must fit in the in-flight budget, or it is never admitted")
        self.max_request_pixels, self.max_pixels_in_flight = max_request_pixels, max_pixels_in_flight
        self.in_flight = 0

    def check_request(self, pixels: int, *, param: str | None = None) -> None:
        """413 if one request's images add up to more than a request may ask for."""
        if pixels > self.max_request_pixels:
            metrics.PIXEL_REFUSALS.labels("413").inc()
            raise APIError(
                413,
                f"the request's images add up to {_megapixels(pixels)} (width x height, summed); at most "
                f"{_megapixels(self.max_request_pixels)} per request: send fewer images or downscale them "
                "(CLIP sees 224x224, LLaVA 336x336)",
                code="too_many_pixels",
                param=param,
            )

    @contextmanager
    def admit(self, pixels: int, *, param: str | None = None) -> Iterator[None]:
        """Hold ``pixels`` of the in-flight budget for the ``with`` block: 413 over the per-request
        budget, 429 while the process has no room. Released however the block ends (an error, or
        the request's task cancelled when its client goes away)."""
        self.check_request(pixels, param=param)
        if pixels == 0:  # text only: nothing to decode
            yield
            return
        # Check and take with no await in between: one event loop per process, so no other
        # request can slip in.
        if self.in_flight + pixels > self.max_pixels_in_flight:
            metrics.PIXEL_REFUSALS.labels("429").inc()
            raise APIError(
                429,
                f"this server is decoding {_megapixels(self.in_flight)} of images already (at most "
                f"{_megapixels(self.max_pixels_in_flight)} at once); retry later",
                code="too_many_pixels_in_flight",
                param=param,
            )
        self.in_flight += pixels
        metrics.PIXELS_IN_FLIGHT.inc(pixels)
        try:
            yield
        finally:
            self.in_flight -= pixels
            metrics.PIXELS_IN_FLIGHT.dec(pixels)
