"""Models every route shares: the strict request base, the one error shape, health, readiness and
the model list. Each family's own request and response models are in its ``protocol.py``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
            if (
                found := lone_surrogate_at(key, path) or lone_surrogate_at(item, f"{path}.{key}".lstrip("."))
            ) is not None:
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
    type: str = Field(
        description="OpenAI's error class: invalid_request_error, not_found_error, rate_limit_error, server_error."
    )
    param: str | None = Field(description="The request field at fault, where one is.")
    code: str | None = Field(description="A machine-readable reason, e.g. invalid_image, image_too_large, overloaded.")


class ErrorResponse(BaseModel):
    """Every error on every route: OpenAI's shape; the HTTP status carries the class."""

    error: ErrorDetail


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
