"""Model services outlive their callers' drain on SIGTERM.

``bentoml serve`` (circus) signals every process at once: the entry service and the model
services it calls. Uvicorn in each stops at once for new connections and waits only for the
requests it is serving. A transcription in flight at the entry service calls the Whisper service
once per window, so between two windows its Whisper worker had nothing in flight, exited, and the
transcription failed with 503 although the entry service was still draining it.

So a model service, on SIGTERM, keeps serving until no request has arrived or run for
``quiet_seconds`` (its callers are done), at most ``max_seconds``, and only then passes the signal
to uvicorn. SIGINT (Ctrl-C) still stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


def keep_serving_while_callers_drain(quiet_seconds: float = 2.0, max_seconds: float = 60.0) -> bool:
    """Install the grace in this worker (call it from the service's ``__init__``, which BentoML runs in
    the worker's main thread once uvicorn handles signals). False where it cannot: not the main
    thread, or SIGTERM not handled by a uvicorn server."""
    if threading.current_thread() is not threading.main_thread():
        return False
    stop = signal.getsignal(signal.SIGTERM)
    server = getattr(stop, "__self__", None)  # uvicorn.Server, its handle_exit bound
    state = getattr(server, "server_state", None)
    if not callable(stop) or state is None:
        return False

    def activity() -> tuple[int, int]:
        return state.total_requests, len(state.tasks)

    def wait_then_stop(signum: int, frame: FrameType | None) -> None:
        started = quiet_since = time.monotonic()
        seen = activity()
        while (now := time.monotonic()) - quiet_since < quiet_seconds and now - started < max_seconds:
            time.sleep(0.05)
            current = activity()
            if current != seen or current[1]:  # a request arrived, finished, or is running
                seen, quiet_since = current, time.monotonic()
        log.info("stopping %.1f s after SIGTERM: callers quiet for %.1f s", now - started, now - quiet_since)
        stop(signum, frame)  # uvicorn's handle_exit only sets flags: safe from this thread

    signalled = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> Any:
        if not signalled.is_set():  # a second SIGTERM waits with the first
            signalled.set()
            threading.Thread(target=wait_then_stop, args=(signum, frame), name="shutdown-grace", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
