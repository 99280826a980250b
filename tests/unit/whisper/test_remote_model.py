"""The entry service's stand-in for the Whisper model sends a window once more when the call broke
on its connection, as the CLIP path does: found by the Whisper benchmark, where a pooled keep-alive
connection that the Whisper service had just closed failed with "Can not write request body" and
the client got 503. Decoding is idempotent; a timeout is not retried."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import torch
from whisper.decoding import DecodingOptions

from services.whisper.protocol import WhisperModelCard, WindowJob, WindowResult
from services.whisper.remote_model import RemoteWhisper
from services.whisper.window_scheduler import WindowScheduler

DIMS = dict(
    n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
    n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2,
)  # fmt: skip


class BrokenFirst:
    """A Whisper service client whose first ``failures`` calls raise ``error``."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def decode_windows(self, jobs: list[WindowJob]) -> list[WindowResult]:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return [
            WindowResult(
                language="en",
                tokens=[1],
                text="hi",
                avg_logprob=0.0,
                no_speech_prob=0.0,
                temperature=0.0,
                compression_ratio=1.0,
            )  # fmt: skip
            for _ in jobs
        ]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The entry service's event loop, on a thread of its own: transcribe's threads call into it."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join()
    running.close()


def decode(client: Any, loop: asyncio.AbstractEventLoop) -> Any:
    card = WhisperModelCard(model="m", revision="r", device="cpu", dims=DIMS, multilingual=True, num_languages=99)
    model = RemoteWhisper(card, client, WindowScheduler(2, 8).admit(1), loop)
    return model.decode(torch.zeros(80, 3000), DecodingOptions(language="en"))


def test_a_window_broken_on_its_connection_is_sent_once_more(loop):
    client = BrokenFirst(1, aiohttp.ClientOSError(None, "Can not write request body"))
    assert decode(client, loop).text == "hi"
    assert client.calls == 2


def test_a_window_broken_twice_reaches_the_caller(loop):
    client = BrokenFirst(2, aiohttp.ServerDisconnectedError())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        decode(client, loop)
    assert client.calls == 2


def test_a_timed_out_window_is_not_sent_again(loop):
    client = BrokenFirst(1, aiohttp.ServerTimeoutError("no answer"))  # a connection error, and a timeout
    with pytest.raises(aiohttp.ServerTimeoutError):
        decode(client, loop)
    assert client.calls == 1
