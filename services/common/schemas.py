"""Request and response models of the public API (the entry service's edge)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Whisper's form fields (multipart, so they are parameters rather than a body model)
ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularity = Literal["segment", "word"]


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (``"\\ud800"``), if anywhere.

    JSON can carry one; no UTF-8 encoder accepts it, so it must be refused at the edge rather than
    fail wherever the text is first encoded (a hash, a tokenizer, vLLM).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (found := lone_surrogate_at(item, f"{path}[{i}]")) is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if (found := lone_surrogate_at(key, path) or lone_surrogate_at(item, f"{path}.{key}".lstrip("."))) is not None:
                return found
    return None


class StrictRequest(BaseModel):
    """A request body (or a part of one): unknown fields and invalid Unicode are client errors."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (where := lone_surrogate_at(data)) is not None:
            raise ValueError(f"{where} is not valid Unicode text (it contains a lone surrogate)")
        return data


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="OpenAI's error class: invalid_request_error, not_found_error, rate_limit_error, server_error.")
    param: str | None = Field(description="The request field at fault, where one is.")
    code: str | None = Field(description="A machine-readable reason, e.g. invalid_image, image_too_large, overloaded.")


class ErrorResponse(BaseModel):
    """Every error on every route: OpenAI's shape; the HTTP status carries the class."""

    error: ErrorDetail


# Native routes (the original design's shapes)


class SearchRequest(StrictRequest):
    image_data: str = Field(min_length=1, description="The image, base64 (raw or a data: URL).")
    texts: list[str] = Field(min_length=1, description="Candidate texts to rank against the image.")
    return_embeddings: bool = False


class SearchEmbeddings(BaseModel):
    """The original design's keys, which its clients read."""

    image_embedding: list[float]
    text_embeddings: list[list[float]]


class SearchResponse(BaseModel):
    similarities: list[float] = Field(description="Cosine similarity of the image to each text, in input order.")
    best_match: str
    best_similarity: float
    embeddings: SearchEmbeddings | None = None


class ClassifyRequest(StrictRequest):
    image_data: str = Field(min_length=1, description="The image, base64 (raw or a data: URL).")
    labels: list[str] = Field(min_length=1, description="Candidate class names.")
    template: str = Field("a photo of a {}", description="Prompt each label is put into; `{}` marks the label.")


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    predictions: list[LabelProbability] = Field(description="Softmax over CLIP's scaled logits, most likely first.")
    best_label: str
    best_probability: float


# OpenAI-compatible embeddings


class EmbeddingsRequest(StrictRequest):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields we do not use

    input: str | list[str] = Field(description="Texts, or images as base64 `data:image/...` URLs.")
    model: str = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# Health


class HealthResponse(BaseModel):
    status: Literal["healthy"] = "healthy"
    device: str


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    families: dict[str, bool] = Field(description="Each family asked about: whether its model service answers ready.")


class NotReadyResponse(ErrorResponse):
    """/ready's 503: the one error shape, and which families are down."""

    families: dict[str, bool] = Field(description="Each family asked about: whether its model service answers ready.")


# Model listing (OpenAI's /v1/models)


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "multimodal-serving"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# Whisper: OpenAI-compatible transcriptions and translations, and the native /transcribe


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
