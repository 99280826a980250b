"""The Whisper routes' logic: OpenAI-style transcriptions and translations, and ``/transcribe``.

How a request is transcribed
----------------------------
Each request runs openai-whisper's own ``whisper.transcribe`` (seeking, timestamp rules,
no-speech and fallback thresholds, language detection, word timestamps) on a worker thread,
against ``RemoteWhisper`` (``services.whisper.remote_model``): a stand-in for the model whose
``decode`` and ``detect_language`` send the window to the Whisper service
(``services.whisper.service``), where BentoML's adaptive batcher merges it with every other
request's windows into one batched forward pass. So
for audio up to 30 s the answer *is* ``model.transcribe(audio, temperature=0,
condition_on_previous_text=False)`` on the same weights, only decoded in company.

Previous-text conditioning is off unless the caller asks for it (``condition_on_previous_text``):
with it, each window's prompt is the text before it, so windows in flight differ in their
``DecodingOptions`` and cannot share a batch (and it is what makes Whisper loop on its own
output). With ``long_audio=sequential``, the request then runs ``transcribe`` as conditioned as its default.
Temperature fallback is off unless ``MULTIMODAL_WHISPER_TEMPERATURE_FALLBACK`` is set, so that
answers are deterministic.

Long recordings: cut at quiet points, then stitched (``services.whisper.chunking``)
-----------------------------------------------------------------------------
``whisper.transcribe`` seeks sequentially: each 30-second window starts where the last
complete segment of the previous one ended, so a 3-minute recording is at least six decodes
one after another, each waiting for the last. Instead, a recording longer than 30 s is cut
into chunks of at most 30 s *before* decoding, and every chunk runs its own
``transcribe`` at the same time, so the chunks' windows meet in the same batches (and any
re-seek inside a chunk is at most a second, short window). Cuts are silence-based rather
than fixed windows with overlap: each cut is placed at the quietest 200 ms (by mean
squared amplitude) of the last 5 s before the 30 s limit, so it falls in a pause between
words when there is one, and stitching needs no de-duplication of overlapped text, which is
fragile with Whisper's segment-level timestamps. Stitching shifts each chunk's segments and
words by the chunk's start and concatenates texts. What this gives up against sequential
seeking: a cut in continuous speech with no pause can split a word; no context crosses a
cut (nor would it with conditioning off); segments end at cuts; and language detection
looks at the first 30 s once for the whole recording, as ``transcribe`` does, and the prompt
goes to the first chunk only, as ``transcribe`` gives it to its first window only.

Fair turns and a bounded queue (``services.whisper.window_scheduler``)
--------------------------------------------------------------
The Whisper service's batcher serves calls first come, first served, so a long recording's
chunk windows, all sent at once, used to fill every batch ahead of a short clip sent a moment
later. Windows therefore wait per request here, and go to the service at most two batches at
a time, one window from each request in turn. A request is admitted with one window per chunk of its
recording, before any is decoded; past ``MULTIMODAL_WHISPER_MAX_QUEUED_WINDOWS`` it gets 429
with ``Retry-After``, and a recording with more chunks than the whole queue holds gets 413.

Timestamps are clamped to the audio's duration and made non-decreasing: ``transcribe``
can report times past the end of a short last window (the model sees 30 s of padded audio).
Word timestamps come from openai-whisper's cross-attention alignment, run in the Whisper
service (``find_alignment`` needs the model's internals; see ``services.whisper.remote_model``).
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import whisper
import whisper.timing
from fastapi import UploadFile
from starlette.responses import JSONResponse, PlainTextResponse, Response
from whisper.audio import N_FFT, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from whisper.utils import WriteSRT, WriteVTT

from configuration.settings import Settings
from services.common import metrics
from services.common.card_cache import LazyCardCache
from services.common.errors import APIError, check_model
from services.common.readiness import ServiceProbe
from services.whisper.audio_decoding import AudioLimits, DecodedAudio, decode_audio
from services.whisper.chunking import plan_chunks, stitch
from services.whisper.protocol import (
    AudioUsage,
    Granularity,
    LongAudioMode,
    ResponseFormat,
    TranscribeResponse,
    TranscriptionResponse,
    TranscriptionSegment,
    TranscriptionVerboseResponse,
    TranscriptionWord,
    WhisperModelCard,
)
from services.whisper.remote_model import RemoteWhisper
from services.whisper.window_scheduler import QueueFull, Ticket, TooManyWindows, WindowScheduler

MODEL_ALIASES = ("whisper-1", "whisper")  # what OpenAI clients send
Task = Literal["transcribe", "translate"]
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # whisper.transcribe's default
MIN_SAMPLING_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class TranscriptionRequest:
    """What a caller asks of a transcription, beside the audio (the routes' form fields, checked)."""

    task: Task
    language: str | None  # ISO 639-1 code; None: detected
    prompt: str | None
    temperature: float
    words: bool  # word timestamps
    long_audio: LongAudioMode
    condition_on_previous_text: bool = False


@dataclass
class Transcript:
    text: str
    language: str  # ISO 639-1 code
    duration: float
    segments: list[dict[str, Any]]  # transcribe's segments, on the recording's time line


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def detection_window(samples: np.ndarray, n_mels: int) -> torch.Tensor:
    """The log-mel window of the first 30 s, padded to 30 s, that a recording's language is
    detected from. For a recording of 30 s or less it is transcribe's own; for a longer one
    transcribe normalises by the loudest frame of the whole, which this does not wait for.

    transcribe pads with 30 s of zeros and keeps the first 3,000 frames. Zeros past one STFT
    width beyond 30 s change none of those frames, nor the maximum they are normalised by
    (silent frames sit at the floor), so this window pads only that far: half the work, the
    same values (tests/unit/whisper/test_audio.py)."""
    head = samples[:N_SAMPLES]
    return pad_or_trim(log_mel_spectrogram(head, n_mels, padding=N_SAMPLES - len(head) + N_FFT), N_FRAMES)


def _subtitles(writer: type[WriteSRT] | type[WriteVTT], segments: list[dict[str, Any]]) -> str:
    """openai-whisper's own SRT/VTT writers, one cue per segment."""
    buffer = io.StringIO()
    cues = [{"start": s["start"], "end": s["end"], "text": s["text"]} for s in segments]
    writer(output_dir=".").write_result({"segments": cues}, file=buffer)
    return buffer.getvalue()


class WhisperAPI:
    def __init__(self, whisper_service: Any, settings: Settings, service_url: str | None = None) -> None:
        self._client = whisper_service.to_async  # the dependency proxy; its sync methods would block the event loop
        self.settings = settings
        self.limits = AudioLimits(settings.max_audio_bytes, settings.max_audio_seconds, settings.ffmpeg_timeout_seconds)
        # Windows go to the Whisper service at most two batches at a time (one decodes while the
        # next forms), taken from requests in turn: the service's own queue (first come, first
        # served) then never holds a long recording's windows ahead of a short clip's.
        self.scheduler = WindowScheduler(2 * settings.whisper_max_batch_size, settings.whisper_max_queued_windows)
        # transcribe is synchronous: one thread per chunk admitted, blocked on its window's turn.
        # Admission bounds the chunks, so the pool never makes an admitted request wait; the
        # scheduler, not the pool, decides who goes next (threads start only as needed).
        self._pool = ThreadPoolExecutor(settings.whisper_max_queued_windows, thread_name_prefix="transcribe")
        self._card: LazyCardCache[WhisperModelCard] = LazyCardCache(self._client)
        self._probe = ServiceProbe("Whisper", service_url)

    async def card(self) -> WhisperModelCard:
        return await self._card.get()

    async def ready(self) -> None:
        await self.card()
        await self._probe.check()  # the card stays cached after the service is gone

    async def model_ids(self) -> list[str]:
        return [(await self.card()).model]

    # Request checks

    async def _check_model(self, model: str) -> None:
        card = await self.card()
        check_model(model, (card.model, *MODEL_ALIASES))

    async def _language(self, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        name = value.strip().lower()
        code = name if name in LANGUAGES else TO_LANGUAGE_CODE.get(name)
        supported = list(LANGUAGES)[: (await self.card()).num_languages]
        if code not in supported:
            message = f"unsupported language {value!r}; use an ISO 639-1 code"
            raise APIError(400, message, code="invalid_language", param="language")
        return code

    async def _decode(self, file: UploadFile) -> DecodedAudio:
        data = await file.read(self.limits.max_bytes + 1)  # one byte past the cap is enough to refuse it
        return await asyncio.to_thread(decode_audio, data, self.limits)

    # Transcription

    async def transcribe(self, audio: DecodedAudio, request: TranscriptionRequest) -> Transcript:
        card = await self.card()
        loop = asyncio.get_running_loop()
        # Sampling divides the logits by the temperature: one as small as 1e-309 is 0.0 in float32 and
        # made every logit infinite (a 500, found by fuzzing). Below this it is greedy decoding anyway.
        temperature = request.temperature
        if temperature < MIN_SAMPLING_TEMPERATURE:
            temperature = 0.0
        fallback = self.settings.whisper_temperature_fallback and temperature == 0
        options: dict[str, Any] = dict(
            task=request.task,
            language=request.language,
            temperature=FALLBACK_TEMPERATURES if fallback else temperature,
            condition_on_previous_text=request.condition_on_previous_text,
            word_timestamps=request.words,
            fp16=False,  # the mels made here are fp32; the Whisper service picks its own precision
            verbose=None,
        )
        # Sequential: one chunk, the whole file, through transcribe's own seeking (its text exactly).
        chunks = plan_chunks(audio.samples) if request.long_audio == "parallel" else [(0, len(audio.samples))]

        def run(function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
            return loop.run_in_executor(self._pool, partial(function, *args))

        # Closing the ticket (on success, failure or a client gone) drops the request's
        # waiting windows, and its chunks still running stop at their next window.
        with self._admit(len(chunks)) as ticket:
            detection: asyncio.Task[dict[str, float]] | None = None
            if len(chunks) > 1 and request.language is None and card.multilingual:
                # As transcribe does it: from the first 30 s, once for the whole recording. Each
                # chunk's transcribe asks for a language after its log-mel, and gets this one: the
                # chunks make their log-mels while the detection is on its way.
                detector = RemoteWhisper(card, self._client, ticket, loop)
                detection = asyncio.ensure_future(self._detect_language(detector, audio.samples))
                detection.add_done_callback(_retrieve)  # chunks that failed first never look at it
            model = RemoteWhisper(card, self._client, ticket, loop, recording_language=detection)
            transcribe = partial(whisper.transcribe, model, **options)
            # With conditioning off, transcribe prompts its first window only; so here, the first chunk.
            prompts = [request.prompt or None] + [None] * (len(chunks) - 1)
            try:
                with metrics.WHISPER_STAGE_DURATION.labels("transcribe").time():
                    results = await asyncio.gather(
                        *(
                            run(partial(transcribe, initial_prompt=chunk_prompt), audio.samples[a:b])
                            for (a, b), chunk_prompt in zip(chunks, prompts, strict=True)
                        )
                    )
            finally:
                if detection is not None and not detection.done():  # a chunk failed first
                    detection.cancel()
        return Transcript(
            text="".join(result["text"] for result in results).strip(),
            language=results[0]["language"],
            duration=audio.duration,
            segments=stitch(chunks, results, audio.duration),
        )

    def _admit(self, windows: int) -> Ticket:
        """A place in the window queue for a recording of ``windows`` chunks, or 429 when it is full."""
        try:
            return self.scheduler.admit(windows)
        except QueueFull:
            message = "too much audio waiting to be transcribed; retry later"
            raise APIError(429, message, code="queue_full") from None
        except TooManyWindows:
            message = f"audio needs {windows} windows, more than this server queues at once"
            raise APIError(413, message, code="audio_too_long") from None

    @staticmethod
    async def _detect_language(model: RemoteWhisper, samples: np.ndarray) -> dict[str, float]:
        """The language probabilities of the recording's first 30 s, as ``transcribe`` detects them."""
        with metrics.WHISPER_STAGE_DURATION.labels("detect_language").time():
            mel = await asyncio.to_thread(detection_window, samples, model.dims.n_mels)
            return await model.language_probabilities(mel)

    async def _run(self, file: UploadFile, request: TranscriptionRequest) -> Transcript:
        started = time.perf_counter()
        with metrics.WHISPER_STAGE_DURATION.labels("decode_audio").time():
            audio = await self._decode(file)
        transcript = await self.transcribe(audio, request)
        metrics.WHISPER_AUDIO_SECONDS.labels(request.task).inc(audio.duration)
        metrics.WHISPER_REAL_TIME_FACTOR.labels(request.task).observe((time.perf_counter() - started) / audio.duration)
        return transcript

    # Routes

    async def openai(
        self,
        *,
        task: Task,
        file: UploadFile,
        model: str,
        language: str | None,
        prompt: str | None,
        response_format: ResponseFormat,
        temperature: float,
        granularities: list[Granularity] | None,
        long_audio: LongAudioMode | None = None,
        condition_on_previous_text: bool = False,
    ) -> Response:
        """``/v1/audio/transcriptions`` and ``/v1/audio/translations``, as OpenAI's API answers them."""
        await self._check_model(model)
        if granularities and response_format != "verbose_json":
            message = "timestamp_granularities[] needs response_format=verbose_json"
            raise APIError(400, message, code="invalid_value", param="timestamp_granularities[]")
        wanted = set(granularities or ["segment"])
        request = TranscriptionRequest(
            task=task,
            language=await self._language(language),
            prompt=prompt,
            temperature=temperature,
            words="word" in wanted,
            long_audio=long_audio or self.settings.whisper_long_audio,
            condition_on_previous_text=condition_on_previous_text,
        )
        transcript = await self._run(file, request)
        usage = AudioUsage(seconds=math.ceil(transcript.duration)) if task == "transcribe" else None
        if response_format == "json":
            return JSONResponse(TranscriptionResponse(text=transcript.text, usage=usage).model_dump(exclude_none=True))
        if response_format == "text":
            return PlainTextResponse(transcript.text + "\n")
        if response_format == "srt":
            return PlainTextResponse(_subtitles(WriteSRT, transcript.segments))
        if response_format == "vtt":
            return Response(_subtitles(WriteVTT, transcript.segments), media_type="text/vtt; charset=utf-8")
        segments = transcript.segments
        verbose = TranscriptionVerboseResponse(
            task=task,
            # OpenAI's: the spoken language's name for a transcription, the output's for a translation.
            language="english" if task == "translate" else LANGUAGES.get(transcript.language, transcript.language),
            duration=round(transcript.duration, 3),
            text=transcript.text,
            segments=[TranscriptionSegment(**s) for s in segments] if "segment" in wanted else None,
            words=[TranscriptionWord(**w) for s in segments for w in s["words"]] if "word" in wanted else None,
            usage=usage,
        )
        return JSONResponse(verbose.model_dump(exclude_none=True))

    async def transcribe_upload(self, file: UploadFile, language: str | None) -> TranscribeResponse:
        """``/transcribe``: the original design's upload -> ``{text, language}``."""
        request = TranscriptionRequest(
            task="transcribe",
            language=await self._language(language),
            prompt=None,
            temperature=0.0,
            words=False,
            long_audio=self.settings.whisper_long_audio,
        )
        transcript = await self._run(file, request)
        return TranscribeResponse(text=transcript.text, language=transcript.language)
