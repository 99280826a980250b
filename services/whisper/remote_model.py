"""A stand-in for openai-whisper's model that decodes in the Whisper service.

``whisper.transcribe`` runs in the gateway unchanged; only the model calls it makes travel,
so they join other requests' windows in the service's batches.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import whisper
import whisper.timing
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import ModelDimensions
from whisper.tokenizer import Tokenizer

from services.common import metrics
from services.common.errors import retry_once_on_connection_error
from services.whisper.protocol import AlignJob, WhisperModelCard, WindowJob
from services.whisper.window_scheduler import Ticket

# The stand-in model has its device on the CPU (mels are made here); on a GPU host
# transcribe would warn about that on every request.
warnings.filterwarnings("ignore", message="Performing inference on CPU when CUDA is available")


class RemoteWhisper:
    """Enough of ``whisper.model.Whisper`` for ``whisper.transcribe``, decoding in the Whisper service.

    ``transcribe`` reads ``dims``, ``device``, ``is_multilingual`` and ``num_languages`` and
    calls ``decode`` and ``detect_language``; those two queue the window with the request's
    ticket, which sends it to the service's batchable APIs in the request's turn, and block
    this worker thread until the batch it joined is done. Word timestamps call
    ``whisper.timing.find_alignment(model, ...)``, which needs the model's cross-attention;
    it is routed to the service's ``align_words`` (see ``_find_alignment``), in turn too.
    """

    def __init__(
        self,
        card: WhisperModelCard,
        client: Any,
        ticket: Ticket,
        loop: asyncio.AbstractEventLoop,
        recording_language: asyncio.Future[dict[str, float]] | None = None,
    ) -> None:
        """``recording_language``: the language probabilities of the whole recording, being detected
        on ``loop``; ``detect_language`` then answers with them, whatever window it is given."""
        self.dims = ModelDimensions(**card.dims)
        self.is_multilingual, self.num_languages = card.multilingual, card.num_languages
        self.device = torch.device("cpu")  # where transcribe puts mels: they travel from here
        self._client, self._ticket, self._loop = client, ticket, loop
        self._recording_language = recording_language
        self._mel_dtype = getattr(torch, card.mel_dtype)

    def _travelling(self, mel: torch.Tensor) -> np.ndarray:
        """A window as it crosses to the service: in the precision the service computes in."""
        return mel.to(self._mel_dtype).contiguous().numpy()

    async def _request(self, method: str, argument: Any) -> Any:
        """Wait for this request's turn (``services.whisper.window_scheduler``), then for the batch the window joins."""
        client = self._client

        async def send() -> Any:
            return await getattr(client, method)(argument)

        with metrics.queued("whisper"):
            # Decoding, detecting and aligning are idempotent: a call broken on its connection goes once more.
            return await self._ticket.run(retry_once_on_connection_error(send, "Whisper"))

    def _call(self, method: str, argument: Any) -> Any:
        """``_request`` from a transcription thread, blocking it until the answer."""
        # Raises CancelledError once the request is over (the ticket closed): its other chunks stop.
        return asyncio.run_coroutine_threadsafe(self._request(method, argument), self._loop).result()

    async def language_probabilities(self, mel: torch.Tensor) -> dict[str, float]:
        """``detect_language`` of one window, from the event loop."""
        probabilities: list[dict[str, float]] = await self._request("detect_language", [self._travelling(mel)])
        return probabilities[0]

    def decode(self, mel: torch.Tensor, options: DecodingOptions) -> DecodingResult | list[DecodingResult]:
        single = mel.ndim == 2
        mels = [mel] if single else list(mel)
        jobs = [WindowJob(mel=self._travelling(m), options=asdict(options)) for m in mels]
        results = [self._call("decode_windows", [job])[0] for job in jobs]  # one call each: they join batches apart
        decoded = [DecodingResult(audio_features=torch.empty(0), **result.model_dump()) for result in results]
        return decoded[0] if single else decoded

    def detect_language(self, mel: torch.Tensor, tokenizer: Tokenizer | None = None) -> tuple[torch.Tensor, Any]:
        single = mel.ndim == 2
        windows = [mel] if single else list(mel)
        probabilities: list[dict[str, float]]
        if self._recording_language is not None:  # a chunk of a recording: the recording's language
            recording_language = self._recording_language

            async def detected() -> dict[str, float]:
                return await asyncio.shield(recording_language)  # one chunk giving up cancels no other's wait

            language = asyncio.run_coroutine_threadsafe(detected(), self._loop).result()
            probabilities = [language] * len(windows)
        else:
            probabilities = self._call("detect_language", [self._travelling(m) for m in windows])
        tokenizer = whisper.tokenizer.get_tokenizer(self.is_multilingual, num_languages=self.num_languages)
        tokens = torch.tensor([tokenizer.to_language_token(max(p, key=p.__getitem__)) for p in probabilities])
        return (tokens[0], probabilities[0]) if single else (tokens, probabilities)

    def find_alignment(
        self, tokenizer: Tokenizer, text_tokens: list[int], mel: torch.Tensor, num_frames: int, **kwargs: Any
    ) -> list[whisper.timing.WordTiming]:
        if not text_tokens:
            return []
        job = AlignJob(
            language=tokenizer.language,
            task=tokenizer.task or "transcribe",
            text_tokens=text_tokens,
            mel=self._travelling(mel),
            num_frames=num_frames,
            **kwargs,
        )
        timings = self._call("align_words", job)
        return [
            whisper.timing.WordTiming(t.word, t.tokens, np.float64(t.start), np.float64(t.end), t.probability)
            for t in timings
        ]


_library_find_alignment = getattr(whisper.timing.find_alignment, "library_version", whisper.timing.find_alignment)


def _find_alignment(
    model: Any, tokenizer: Tokenizer, text_tokens: list[int], mel: torch.Tensor, num_frames: int, **kwargs: Any
) -> list[whisper.timing.WordTiming]:
    """``whisper.timing.find_alignment``, sending a ``RemoteWhisper``'s work to the Whisper service.

    ``add_word_timestamps`` looks the function up in its module when it runs, and has no
    other seam: this is the one patch of openai-whisper, and it changes nothing for real models.
    """
    if isinstance(model, RemoteWhisper):
        return model.find_alignment(tokenizer, text_tokens, mel, num_frames, **kwargs)
    return _library_find_alignment(model, tokenizer, text_tokens, mel, num_frames, **kwargs)


_find_alignment.library_version = _library_find_alignment  # type: ignore[attr-defined]
whisper.timing.find_alignment = _find_alignment
