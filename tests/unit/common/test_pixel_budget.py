"""Pixel budgets: per request (413), in flight per process (429), and the decompression-bomb check.

Also the chat route's use of them, without a server (``LlavaAPI`` with no LLaVA service answers 503
after its checks, which is where these tests look).
"""

from __future__ import annotations

import asyncio
import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from configuration.settings import Settings
from services.common.errors import APIError, install_error_handlers
from services.common.image_validation import BombCheck, read_image
from services.common.pixel_budget import PixelBudget
from services.llava.api import LlavaAPI
from services.llava.protocol import ChatCompletionRequest
from tests.helpers import data_url, image_chat, jpeg_bytes, palette_png, photograph, png_bytes, random_image

# In flight


def test_a_request_holds_its_pixels_until_it_ends_and_then_releases_them():
    budget = PixelBudget(max_request_pixels=100, max_pixels_in_flight=150)
    with budget.admit(100):
        assert budget.in_flight == 100
    assert budget.in_flight == 0


def test_an_error_inside_the_request_releases_its_pixels():
    budget = PixelBudget(100, 150)
    with pytest.raises(RuntimeError), budget.admit(80):
        raise RuntimeError("the model service failed")
    assert budget.in_flight == 0


def test_a_cancelled_request_releases_its_pixels():
    budget = PixelBudget(100, 150)
    entered = asyncio.Event()

    async def request() -> None:
        with budget.admit(90):
            entered.set()
            await asyncio.sleep(3600)  # waiting on a model service when the client goes away

    async def scenario() -> None:
        task = asyncio.create_task(request())
        await entered.wait()
        assert budget.in_flight == 90
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert budget.in_flight == 0


def test_past_the_in_flight_budget_a_request_gets_429_and_takes_nothing():
    budget = PixelBudget(100, 150)
    with budget.admit(100):
        with pytest.raises(APIError) as refused, budget.admit(60):
            pytest.fail("admitted past the budget")
        assert (refused.value.status, refused.value.code) == (429, "too_many_pixels_in_flight")
        assert budget.in_flight == 100
        with budget.admit(50):  # exactly what is left still fits
            assert budget.in_flight == 150
    assert budget.in_flight == 0
    with budget.admit(60):  # and once the first is done, room again
        pass


def test_the_429_carries_retry_after_in_the_error_shape():
    budget = PixelBudget(100, 100)
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/decode")
    async def decode() -> dict:
        with budget.admit(60):
            return {"ok": True}

    client = TestClient(app)
    assert client.get("/decode").status_code == 200
    with budget.admit(50):  # another request of this process holds half the budget
        response = client.get("/decode")
    assert response.status_code == 429
    assert response.headers["Retry-After"].isdigit()
    assert response.json()["error"]["code"] == "too_many_pixels_in_flight"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_text_only_requests_are_never_refused():
    budget = PixelBudget(100, 100)
    with budget.admit(100), budget.admit(0):
        assert budget.in_flight == 100


# Per request


def test_a_request_over_its_own_budget_is_413_even_on_an_idle_server():
    budget = PixelBudget(100, 1000)
    with pytest.raises(APIError) as refused, budget.admit(101, param="input"):
        pytest.fail("admitted")
    assert (refused.value.status, refused.value.code, refused.value.param) == (413, "too_many_pixels", "input")
    assert "per request" in refused.value.message and "downscale" in refused.value.message
    assert budget.in_flight == 0


def test_a_request_budget_larger_than_the_in_flight_budget_is_refused_at_start():
    with pytest.raises(ValueError):
        PixelBudget(200, 100)
    with pytest.raises(ValueError):
        Settings(max_request_pixels=200, max_pixels_in_flight=100)


def test_the_default_budget_takes_a_24_megapixel_photograph_and_four_at_once():
    settings = Settings()
    photo = 6000 * 4000
    assert photo <= settings.max_image_pixels
    assert 4 * photo <= settings.max_request_pixels
    assert settings.max_request_pixels >= 256 * 640 * 480  # a full embeddings batch of VGA images
    assert settings.max_request_pixels <= settings.max_pixels_in_flight


# Decompression bombs (header only)

DEFAULTS = Settings()
CHECK = BombCheck(DEFAULTS.max_image_pixels_per_byte, DEFAULTS.image_ratio_check_min_pixels)
LIMITS = {"max_bytes": DEFAULTS.max_image_bytes, "max_pixels": DEFAULTS.max_image_pixels, "bomb_check": CHECK}


def test_the_6324_square_palette_bomb_is_413_under_the_per_image_cap():
    bomb = palette_png(6324, 6324)
    assert DEFAULTS.max_image_pixels >= 6324 * 6324 and len(bomb) < 64_000
    with pytest.raises(APIError) as refused:
        read_image(data_url(bomb), param="image_data", **LIMITS)
    assert (refused.value.status, refused.value.code) == (413, "image_too_large")
    assert "decompression bomb" in refused.value.message
    # Without the check it passed (the defect): only the ratio tells it from a photograph.
    assert (
        read_image(
            data_url(bomb), param="image_data", max_bytes=DEFAULTS.max_image_bytes, max_pixels=DEFAULTS.max_image_pixels
        ).pixels
        == 6324 * 6324
    )


@pytest.mark.parametrize("quality", [95, 60])
def test_a_24_megapixel_photograph_passes_the_default_checks(quality):
    # An upscaled photograph is smoother, so smaller per pixel, than a real 24 MP one: a harder case.
    jpeg = jpeg_bytes(photograph("astronaut.png").convert("RGB"), (6000, 4000), quality=quality)
    image = read_image(data_url(jpeg, "image/jpeg"), param="p", **LIMITS)
    assert image.pixels == 24_000_000 and image.mime == "image/jpeg"


def test_a_flat_jpeg_passes_but_a_flat_png_of_the_same_size_does_not():
    flat = Image.new("RGB", (4000, 3000), (200, 30, 30))
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG", quality=90)
    assert read_image(data_url(buffer.getvalue(), "image/jpeg"), param="p", **LIMITS).pixels == 12_000_000
    with pytest.raises(APIError) as refused:  # 42 KB for 12 MP: the solid-PNG attack
        read_image(data_url(png_bytes(flat)), param="p", **LIMITS)
    assert refused.value.status == 413


def test_small_flat_images_skip_the_ratio_check():
    tiny = png_bytes(Image.new("RGB", (2000, 2000), "white"))  # 4 MP in ~17 KB: over 200 pixels per byte
    assert 2000 * 2000 / len(tiny) > DEFAULTS.max_image_pixels_per_byte
    assert read_image(data_url(tiny), param="p", **LIMITS).pixels == 2000 * 2000


# Chat: the same budgets, applied before any image is decoded


def chat_request(*urls: str) -> ChatCompletionRequest:
    content = [part for url in urls for part in image_chat(url)[0]["content"][:1]] + [{"type": "text", "text": "what?"}]
    return ChatCompletionRequest.model_validate(
        {"model": "tiny-llava", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    )


def llava(budget: PixelBudget) -> LlavaAPI:
    return LlavaAPI(Settings(), "tiny-llava", None, budget)


def test_chat_images_over_the_request_budget_are_413_before_decoding():
    budget = PixelBudget(max_request_pixels=5000, max_pixels_in_flight=10_000)
    image = data_url(png_bytes(random_image(1, (60, 50))))  # 3000 pixels each
    with pytest.raises(APIError) as refused:
        asyncio.run(llava(budget).chat(chat_request(image, image)))
    assert (refused.value.status, refused.value.code, refused.value.param) == (413, "too_many_pixels", "messages")


def test_chat_is_429_while_the_process_budget_is_full_and_releases_after_an_error():
    budget = PixelBudget(max_request_pixels=5000, max_pixels_in_flight=5000)
    image = data_url(png_bytes(random_image(2, (60, 50))))
    api = llava(budget)
    with budget.admit(4000):
        with pytest.raises(APIError) as busy:
            asyncio.run(api.chat(chat_request(image)))
        assert (busy.value.status, busy.value.code) == (429, "too_many_pixels_in_flight")
    # Admitted now; with no LLaVA service behind it the request ends in 503, its pixels released.
    with pytest.raises(APIError) as unavailable:
        asyncio.run(api.chat(chat_request(image)))
    assert unavailable.value.status == 503
    assert budget.in_flight == 0


def test_the_chat_palette_bomb_is_413():
    with pytest.raises(APIError) as refused:
        asyncio.run(llava(PixelBudget(10**8, 10**8)).chat(chat_request(data_url(palette_png(6324, 6324)))))
    assert (refused.value.status, refused.value.code) == (413, "image_too_large")
