"""Whisper's models: the public API's answers, and what the entry service and the Whisper service
send each other (windows to decode, words to align, the model card). Pydantic and numpy only:
importing this never imports torch or openai-whisper."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# Whisper's form fields (multipart, so they are parameters rather than a body model)
ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularity = Literal["segment", "word"]
# How a recording longer than one window is transcribed (README, "Whisper"): cut at pauses into
# chunks decoded at once, or openai-whisper's own seeking through the whole file, window after window.
LongAudioMode = Literal["parallel", "sequential"]


# OpenAI-compatible transcriptions and translations, and the native /transcribe


class AudioUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: int = Field(description="Audio duration, rounded up to whole seconds.")


class TranscriptionResponse(BaseModel):
    """`response_format=json`."""

    text: str
    usage: AudioUsage | None = None


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int = Field(description="Offset of the window this segment was decoded from, in 10 ms mel frames.")
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerboseResponse(BaseModel):
    """`response_format=verbose_json`: segments and words as `timestamp_granularities[]` asks."""

    task: Literal["transcribe", "translate"]
    language: str = Field(
        description="English name, lowercase, as OpenAI gives it: the spoken language, or `english` for a translation."
    )
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: AudioUsage | None = None


class TranscribeResponse(BaseModel):
    """The original design's `/transcribe` answer."""

    text: str
    language: str = Field(description="ISO 639-1 code of the spoken (given or detected) language.")


# Between the entry service and the Whisper service

Mel = Annotated[
    np.ndarray,
    WithJsonSchema({"type": "array", "description": "log-mel window (n_mels, 3000), in the card's mel_dtype"}),
]


class WhisperModelCard(BaseModel):
    """What the entry service needs to run ``whisper.transcribe`` against this model."""

    model: str
    revision: str
    device: str
    dims: dict[str, int]  # whisper.model.ModelDimensions
    multilingual: bool
    num_languages: int
    # The precision the service computes in: windows travel in it. In float16 a window is half the
    # bytes across the hop, and the service would cast a float32 one to the same values anyway.
    mel_dtype: Literal["float32", "float16"] = "float32"


class WindowJob(BaseModel):
    """One 30-second window to decode, with the ``whisper.DecodingOptions`` fields to decode it by."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    mel: Mel
    options: dict[str, Any]


class WindowResult(BaseModel):
    """``whisper.DecodingResult`` less its encoder output (megabytes that transcribe never reads)."""

    language: str
    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


class AlignJob(BaseModel):
    """Arguments of ``whisper.timing.find_alignment`` for one window's text."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    language: str | None
    task: str
    text_tokens: list[int]
    mel: Mel
    num_frames: int
    medfilt_width: int = 7
    qk_scale: float = 1.0


class WordTiming(BaseModel):
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float
