"""The Whisper family's URLs: OpenAI's ``/v1/audio/transcriptions`` and ``/v1/audio/translations``,
and the original design's ``/transcribe`` (multipart uploads, as OpenAI's audio API takes them).

Declared once, on this router, which the entry service mounts; what each route does is
``services.whisper.api.WhisperAPI``. This module imports neither torch nor openai-whisper: the
entry service mounts it even where it does not serve Whisper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from starlette.responses import Response

from services.common.errors import APIError, error_responses
from services.common.routing import served_family
from services.whisper.protocol import (
    Granularity,
    LongAudioMode,
    ResponseFormat,
    TranscribeResponse,
    TranscriptionResponse,
    TranscriptionVerboseResponse,
)

if TYPE_CHECKING:
    from services.whisper.api import WhisperAPI

AUDIO_ROUTE_ERRORS = error_responses(400, 404, 413, 415, 429, 503, 504)
# The audio routes answer JSON or, by `response_format`, plain text, SRT or WebVTT.
AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUDIO_ROUTE_ERRORS,
    200: {
        "model": TranscriptionResponse | TranscriptionVerboseResponse,
        "description": "`json` and `verbose_json` as JSON; `text` and `srt` as text/plain; `vtt` as text/vtt.",
        "content": {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}},
    },
}
AUDIO_FILE = "The audio: wav, flac, mp3, ogg, m4a/mp4, webm, aac."

router = APIRouter(tags=["whisper"])
CONDITION = (
    "Not OpenAI's: openai-whisper's `condition_on_previous_text`: each 30-second window is prompted with "
    "the text before it. Off by default: conditioned windows decode apart from other requests' (slower) "
    "and can make Whisper repeat itself."
)
LONG_AUDIO = (
    "Not OpenAI's: how a recording over 30 s is transcribed. `parallel` (the server's default unless "
    "MULTIMODAL_WHISPER_LONG_AUDIO says otherwise) cuts it at pauses and decodes the chunks at once; "
    "`sequential` is openai-whisper's `transcribe` over the whole file."
)


def _whisper() -> WhisperAPI:
    return served_family("whisper")


@router.post("/v1/audio/transcriptions", response_model=None, responses=AUDIO_RESPONSES)
async def audio_transcriptions(
    file: Annotated[UploadFile, File(description=AUDIO_FILE)],
    model: Annotated[str, Form()],
    language: Annotated[str | None, Form(description="ISO 639-1 code; detected when unset.")] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
    timestamp_granularities: Annotated[list[Granularity] | None, Form(alias="timestamp_granularities[]")] = None,
    long_audio: Annotated[LongAudioMode | None, Form(description=LONG_AUDIO)] = None,
    condition_on_previous_text: Annotated[bool, Form(description=CONDITION)] = False,
) -> Response:
    """OpenAI-compatible speech to text (Whisper), in the language spoken."""
    return await _whisper().openai(
        task="transcribe",
        file=file,
        model=model,
        language=language,
        prompt=prompt,
        response_format=response_format,
        temperature=temperature,
        granularities=timestamp_granularities,
        long_audio=long_audio,
        condition_on_previous_text=condition_on_previous_text,
    )


@router.post("/v1/audio/translations", response_model=None, responses=AUDIO_RESPONSES)
async def audio_translations(
    file: Annotated[UploadFile, File(description=AUDIO_FILE)],
    model: Annotated[str, Form()],
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
    long_audio: Annotated[LongAudioMode | None, Form(description=LONG_AUDIO)] = None,
    condition_on_previous_text: Annotated[bool, Form(description=CONDITION)] = False,
) -> Response:
    """OpenAI-compatible speech to English text (Whisper's translate task)."""
    return await _whisper().openai(
        task="translate",
        file=file,
        model=model,
        language=None,  # translations take no language: Whisper detects the spoken one
        prompt=prompt,
        response_format=response_format,
        temperature=temperature,
        granularities=None,  # OpenAI's translations take no timestamp_granularities[]
        long_audio=long_audio,
        condition_on_previous_text=condition_on_previous_text,
    )


@router.post("/transcribe", responses=AUDIO_ROUTE_ERRORS)
async def transcribe(
    audio: Annotated[UploadFile | None, File(description=AUDIO_FILE)] = None,
    file: Annotated[UploadFile | None, File(description="The same, under OpenAI's field name.")] = None,
    language: Annotated[str | None, Form(description="ISO 639-1 code; detected when unset.")] = None,
) -> TranscribeResponse:
    """Upload audio (field `audio`, as the original design names it, or `file`), get its text and language."""
    upload = audio or file
    if upload is None:
        raise APIError(
            400, "upload the audio in the multipart field `audio` (or `file`)", code="missing_file", param="audio"
        )
    return await _whisper().transcribe_upload(upload, language)
