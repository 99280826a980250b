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


class Detector:
    """A Whisper service client that counts language detections and answers one language."""

    def __init__(self) -> None:
        self.detections = 0

    async def detect_language(self, mels: list[Any]) -> list[dict[str, float]]:
        self.detections += 1
        return [{"en": 0.2, "de": 0.8} for _ in mels]


def remote(client: Any, loop: asyncio.AbstractEventLoop, mel_dtype: str = "float32", **kwargs: Any) -> RemoteWhisper:
    card = WhisperModelCard(
        model="m", revision="r", device="cpu", dims=DIMS, multilingual=True, num_languages=99, mel_dtype=mel_dtype
    )
    return RemoteWhisper(card, client, WindowScheduler(2, 8).admit(1), loop, **kwargs)


def test_a_chunk_gets_the_recording_language_being_detected_without_a_call_of_its_own(loop):
    """transcribe asks each chunk's model for the language of the chunk's first window; a long
    recording's chunks all get the language of the recording's first 30 s instead, detected once,
    and may ask before that detection has come back."""
    client = Detector()
    detector = remote(client, loop)

    async def recording_language() -> dict[str, float]:
        await asyncio.sleep(0.2)  # still on its way when the chunks ask
        return await detector.language_probabilities(torch.zeros(80, 3000))

    detection = asyncio.run_coroutine_threadsafe(_task(recording_language()), loop).result()
    chunk = remote(client, loop, recording_language=detection)
    token, probabilities = chunk.detect_language(torch.ones(80, 3000))
    assert probabilities == {"en": 0.2, "de": 0.8}
    assert client.detections == 1
    tokens, batch = chunk.detect_language(torch.ones(2, 80, 3000))
    assert batch == [probabilities, probabilities] and tokens.tolist() == [int(token)] * 2
    assert client.detections == 1


def test_a_failed_recording_detection_fails_the_chunks_that_wait_for_it(loop):
    async def failing() -> dict[str, float]:
        raise aiohttp.ServerDisconnectedError()

    detection = asyncio.run_coroutine_threadsafe(_task(failing()), loop).result()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        remote(Detector(), loop, recording_language=detection).detect_language(torch.ones(80, 3000))


async def _task(coroutine: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coroutine)


class Recording(BrokenFirst):
    """A Whisper service client that keeps the windows it is sent."""

    def __init__(self) -> None:
        super().__init__(0, RuntimeError())
        self.mels: list[Any] = []

    async def decode_windows(self, jobs: list[WindowJob]) -> list[WindowResult]:
        self.mels += [job.mel for job in jobs]
        return await super().decode_windows(jobs)

    async def detect_language(self, mels: list[Any]) -> list[dict[str, float]]:
        self.mels += mels
        return [{"en": 1.0} for _ in mels]


@pytest.mark.parametrize("mel_dtype", ["float32", "float16"])
def test_windows_travel_in_the_precision_the_service_computes_in(loop, mel_dtype):
    """A service on a GPU computes in float16 and says so in its card: its windows cross the hop at
    half the bytes, with the values the service's own cast would give them."""
    client = Recording()
    model = remote(client, loop, mel_dtype)
    mel = torch.randn(80, 3000)
    model.decode(mel, DecodingOptions(language="en"))
    model.detect_language(mel)
    assert [m.dtype.name for m in client.mels] == [mel_dtype, mel_dtype]
    for sent in client.mels:
        assert torch.equal(torch.from_numpy(sent), mel.to(getattr(torch, mel_dtype)))
