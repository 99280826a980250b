"""Entry service: the public HTTP API, composing the model services.

Routes are a FastAPI app mounted on the BentoML service so that every route, native or
OpenAI-compatible, answers errors in one JSON shape (``services.common.errors``). Each model
family declares its routes once, on an ``APIRouter`` (``services/<family>/routes.py``), and keeps
their logic beside them (``services/<family>/api.py``); this file mounts the routers, builds the
served families' route logic, and answers ``/v1/models``, ``/health`` and ``/ready`` itself.
The model services are BentoML dependencies: separate processes under ``bentoml serve``
(pickle over a local socket), in-process under ``Gateway.to_asgi()``. A family's route logic, and
the heavy libraries it brings (torch, openai-whisper), are imported only when it is served; its
router is always mounted, so that every deployment documents the same URLs and answers 404
``not_served`` for a family it does not serve. The request metrics read the route-to-family map
from the routers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated, Any, Literal

import bentoml
from fastapi import APIRouter, FastAPI, Query
from fastapi.routing import APIRoute
from starlette.responses import Response

from configuration.families import Family
from configuration.profiles import model_spec
from configuration.settings import get_settings
from services.clip import routes as clip_routes
from services.common import metrics
from services.common.auth import APIKeyMiddleware, document_bearer_auth
from services.common.errors import (
    APIError,
    NotFoundInErrorShape,
    document_errors_truthfully,
    error_response,
    error_responses,
    install_error_handlers,
)
from services.common.garbage_collection import freeze_start_up_objects
from services.common.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware
from services.common.model_service import as_service
from services.common.own_listening_socket import listen_on_own_socket_when_ready
from services.common.pixel_budget import PixelBudget
from services.common.schemas import HealthResponse, ModelList, ModelObject, NotReadyResponse, ReadyResponse
from services.library import routes as library_routes
from services.llava import routes as llava_routes
from services.whisper import routes as whisper_routes

log = logging.getLogger(__name__)

# Model services listen on loopback TCP, not on Unix sockets: on SIGTERM `bentoml serve` deletes its
# Unix sockets' folder at once, before any process has drained, so a request in flight that needs
# a new connection to a model service (a transcription's next window) failed with 503. TCP
# sockets stay open until every process has stopped (services/common/shutdown_grace.py).
# Read by `bentoml serve` when it creates the sockets, after importing this module.
os.environ.setdefault("BENTOML_NO_UDS", "1")
settings = get_settings()
# Families are asked at once, each within this: one hung service cannot hold the probe past a kubelet's timeout.
READY_TIMEOUT_SECONDS = 5.0
if "clip" in settings.families:
    from services.clip.api import ClipAPI
    from services.clip.cache import build_cache
    from services.clip.embedder import ClipEmbedder
    from services.clip.service import CLIP
    from services.library.api import LibraryAPI
    from services.library.store import open_store
if "llava" in settings.families:
    from services.llava.api import LlavaAPI
    from services.llava.service import LLaVA
if "whisper" in settings.families:
    from services.whisper.api import WhisperAPI
    from services.whisper.service import Whisper

app = FastAPI(title="Multimodal serving", description="CLIP, LLaVA and Whisper behind one API.")
install_error_handlers(app)
document_errors_truthfully(app)

# Each family's routes, mounted whether or not it is served. The request metrics count each route under its family.
ROUTERS: dict[Family, APIRouter] = {
    "clip": clip_routes.router,
    "llava": llava_routes.router,
    "whisper": whisper_routes.router,
}
for router in ROUTERS.values():
    app.include_router(router)
ROUTE_FAMILIES = {
    route.path: family for family, router in ROUTERS.items() for route in router.routes if isinstance(route, APIRoute)
}
# The image library is CLIP's (served when CLIP is), with metrics of its own: services/library/routes.py says why.
app.include_router(library_routes.router)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="Gateway", workers=settings.gateway_workers, traffic={"timeout": settings.request_timeout_seconds}
)
class Gateway:
    # Only the enabled families' services are started (MULTIMODAL_FAMILIES), so a deployment
    # without a GPU for LLaVA, say, serves CLIP and Whisper alone.
    if "clip" in settings.families:
        clip = bentoml.depends(CLIP)
    if "llava" in settings.families:
        llava = bentoml.depends(LLaVA)
    if "whisper" in settings.families:
        whisper = bentoml.depends(Whisper)

    def __init__(self) -> None:
        self.families: dict[str, Any] = {}  # family -> its route logic (ClipAPI, ...)
        # One budget per worker process, shared by CLIP and chat images: both decode pixels.
        pixels = PixelBudget(settings.max_request_pixels, settings.max_pixels_in_flight)
        if "clip" in settings.families:
            self.embedder = ClipEmbedder(self.clip, build_cache(settings), settings)
            self.families["clip"] = ClipAPI(self.embedder, settings, pixels, as_service(CLIP).url)
            self.library = LibraryAPI(self.embedder, open_store(settings), settings, pixels)
        if "llava" in settings.families:
            self.families["llava"] = LlavaAPI(settings, model_spec("llava").tag, as_service(LLaVA).url, pixels)
        if "whisper" in settings.families:
            self.families["whisper"] = WhisperAPI(self.whisper, settings, as_service(Whisper).url)
            # This process's torch work is log-mels, one per window, on transcription threads that run
            # at once: one core each. torch's default pool (a thread per core) behind every one of them
            # oversubscribed the cores (here, 2 cores: 64 log-mels from 32 threads took 32 ms each, 13 ms
            # on one thread each), and the windows of 32 concurrent recordings reached the GPU late.
            import torch

            torch.set_num_threads(1)
        freeze_start_up_objects(settings.freeze_start_up_objects)  # common/garbage_collection.py
        listen_on_own_socket_when_ready()  # connections spread evenly over workers: common/own_listening_socket.py

    def family(self, name: str) -> Any:
        """The route logic of a served family (``services.common.routing.served_family``); 404 for another."""
        api = self.families.get(name)
        if api is None:
            raise APIError(404, f"this deployment does not serve {name} (MULTIMODAL_FAMILIES)", code="not_served")
        return api

    # Every family

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        ids = [model_id for api in self.families.values() for model_id in await api.model_ids()]
        return ModelList(data=[ModelObject(id=model_id) for model_id in ids])

    @app.get("/health")
    async def health(self) -> HealthResponse:
        """Liveness: answers without calling any model service."""
        card = self.embedder.known_card if "clip" in self.families else None
        return HealthResponse(device=card.device if card else settings.device)

    @app.get(
        "/ready",
        response_model=ReadyResponse,
        responses={
            **error_responses(400, 404),
            503: {"model": NotReadyResponse, "description": "Not ready: the families asked about, each true or false."},
        },
    )
    async def ready(
        self,
        family: Annotated[
            list[Family] | None,
            Query(
                description="Families to ask about (repeat the parameter for several); every served family when unset."
            ),
        ] = None,
        require: Annotated[
            Literal["all", "any"],
            Query(description="`all`: ready when every family asked about is; `any`: when one is."),
        ] = "all",
    ) -> ReadyResponse | Response:
        """Readiness per family: each family's model service answers ready; 200 or 503 by `require`."""
        names = list(dict.fromkeys(family or self.families))
        for name in names:
            self.family(name)  # 404 for a family this deployment does not serve
        states = dict(zip(names, await asyncio.gather(*(self._family_ready(name) for name in names)), strict=True))
        if all(states.values()) if require == "all" else any(states.values()):
            return ReadyResponse(families=states)
        down = ", ".join(name for name, up in states.items() if not up)
        return error_response(503, f"not ready: {down}", code="not_ready", extra={"families": states})

    async def _family_ready(self, name: str) -> bool:
        try:
            await asyncio.wait_for(self.families[name].ready(), timeout=READY_TIMEOUT_SECONDS)
        except Exception as exc:  # any failure, a timeout included, means not ready
            log.info("%s not ready: %r", name, exc)
            return False
        return True


# Added after the routes exist (Starlette builds its middleware stack at the first request).
app.add_middleware(metrics.RequestMetricsMiddleware, families=ROUTE_FAMILIES)
app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)

# Around BentoML's outer router too, whose own 404 for an unknown path is text/plain.
as_service(Gateway).add_asgi_middleware(NotFoundInErrorShape)

# Optional API keys (services/common/auth.py): on the whole BentoML app, so that /metrics and BentoML's own
# routes are covered too, not only the FastAPI routes.
if api_keys := settings.all_api_keys():
    as_service(Gateway).add_asgi_middleware(APIKeyMiddleware, keys=api_keys, metrics_open=settings.metrics_open)
    document_bearer_auth(app, APIKeyMiddleware.open_paths_for(settings.metrics_open))
