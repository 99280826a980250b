"""The ``@bentoml.service`` arguments every model service (CLIP, LLaVA, Whisper) shares, written once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import bentoml

from configuration.settings import get_settings
from services.common.device import gpu_resources

T = TypeVar("T")

# BentoML 1.4.40 replaces its client session to a dependency every 100 requests (or 5 min)
# and closes the old one under requests still in flight, which fail ("Cannot write to
# closing transport"; bentoml/BentoML#5540, #5544). Over a local socket there is nothing
# to rebalance, so keep one session for the life of the process.
ONE_CLIENT_SESSION = {"max_requests": 2**62, "max_age": 10.0**12}


def as_service(cls: type[T]) -> bentoml.Service[T]:
    """A class under ``@bentoml.service``, typed as what the decorator made it: a ``bentoml.Service``
    (``.url``, ``.context``, ``.add_asgi_middleware``). mypy keeps a decorated class's own type."""
    return cast("bentoml.Service[T]", cls)


def model_service(name: str, **options: Any) -> Callable[[type[T]], bentoml.Service[T]]:
    """``@bentoml.service`` for a model service: the request timeout, a GPU when the device is
    ``cuda``, one client session for its callers; ``options`` adds the service's own."""
    return bentoml.service(
        name=name,
        traffic={"timeout": get_settings().request_timeout_seconds},
        resources=gpu_resources(),
        runner_connection=ONE_CLIENT_SESSION,
        **options,
    )


def batched_api(max_batch_size: int, max_latency_ms: int) -> Any:
    """``@bentoml.api`` with adaptive batching up to ``max_batch_size`` items. BentoML refuses a
    batchable API with a max batch size of 1, so at 1 (batching off, to measure what batching is
    worth) the API is a plain one: each call's list is one batch, and callers send one item a call."""
    if max_batch_size > 1:
        return bentoml.api(batchable=True, max_batch_size=max_batch_size, max_latency_ms=max_latency_ms)
    return bentoml.api
