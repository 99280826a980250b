"""Continuous batching in two overlapped stages, inside a model service's process.

Why not BentoML's adaptive batcher: it runs one batch at a time per worker (a semaphore of one in
``bentoml/_internal/marshal/dispatcher.py``), and a batch's whole life happens inside it: preparing
its inputs (decoding and resizing images, tokenising texts), then the model. So the GPU waits while
the next batch is prepared, and on an H200 that preparation (nvJPEG decoding, which holds its
thread until the decoder is done) cost about a third of each batch (bench/RESULTS.md, runs 5-8).

Here a batch goes through two stages, each on a thread of its own:

    prepare batch k+1  |  prepare batch k+2  | ...
    model on batch k   |  model on batch k+1 | ...

The model thread takes each prepared batch straight from the prepare stage, not through the event
loop: under load the loop is busy receiving requests (a CLIP worker's loop parsed 1 MB bodies 25%
of the time in run 16, bench/RESULTS.md), and each hand-off through it left the GPU idle between
batches. Results go back to the callers through the loop.

At most one prepared batch waits for the model, and a batch is taken from the queue only when the
model has taken the one before it, so under load each batch holds every item that arrived while the
model ran the last one (up to ``max_batch``): the batch size follows the load, as vLLM's scheduler
does. A lone item waits for nothing. Items that waited in the queue longer than ``max_wait_seconds``
are refused with 503 (BentoML's batcher sheds load the same way), so an overloaded service answers
quickly instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from bentoml.exceptions import ServiceUnavailable

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Prepared = TypeVar("Prepared")


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    future: asyncio.Future[np.ndarray]
    since: float = field(default_factory=time.monotonic)


@dataclass
class _LoopState(Generic[Item, Prepared]):
    """What belongs to one event loop: asyncio's primitives cannot be shared across loops, and an
    in-process test client may run the service on more than one."""

    loop: asyncio.AbstractEventLoop
    waiting: deque[_Waiting[Item]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # The prepare stage may run one batch ahead of the model, no more.
    ahead: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    # Prepared batches for the model thread (never more than one: ``ahead``); None stops it.
    prepared: queue.SimpleQueue[tuple[list[_Waiting[Item]], Prepared] | None] = field(default_factory=queue.SimpleQueue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # A daemon thread: one blocked on an empty queue must not hold up the process's exit.
    model: threading.Thread | None = None

    @property
    def ended(self) -> bool:
        """A stage that ended on a bug (logged): the batcher starts afresh rather than leave callers waiting."""
        return any(task.done() for task in self.tasks) or (self.model is not None and not self.model.is_alive())


def _fail(batch: Sequence[_Waiting[Any]], exc: BaseException) -> None:
    for waiting in batch:
        if not waiting.future.done():
            waiting.future.set_exception(exc)


class ContinuousBatcher(Generic[Item, Prepared]):
    """``await batcher(items)``: one result row per item, from batches shared with concurrent callers.

    ``prepare(items)`` runs on the prepare thread, ``run(prepared)`` (one row per item) on the model
    thread; the two may overlap on different batches, never on the same one.
    """

    def __init__(
        self,
        prepare: Callable[[list[Item]], Prepared],
        run: Callable[[Prepared], np.ndarray],
        *,
        max_batch: int,
        max_wait_seconds: float,
        name: str,
    ) -> None:
        self._prepare, self._run = prepare, run
        self.max_batch, self.max_wait_seconds, self.name = max_batch, max_wait_seconds, name
        self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-prepare")
        # One set of stages per event loop: an in-process test client may serve on several, at once.
        self._states: dict[asyncio.AbstractEventLoop, _LoopState[Item, Prepared]] = {}
        self._states_lock = threading.Lock()  # those loops run on threads of their own

    async def __call__(self, items: list[Item]) -> np.ndarray:
        if not items:
            return np.empty((0, 0), dtype=np.float32)
        state = self._started()
        waiting = [_Waiting(item, state.loop.create_future()) for item in items]
        state.waiting.extend(waiting)
        state.arrived.set()
        # A cancelled caller (client gone, timeout) cancels its futures; the stages skip those items.
        rows = await asyncio.gather(*(w.future for w in waiting))
        return np.stack(rows)

    @property
    def queued(self) -> int:
        with self._states_lock:
            return sum(len(state.waiting) for state in self._states.values())

    def _started(self) -> _LoopState[Item, Prepared]:
        """This loop's stages, started on its first call, or afresh after a stage ended on a bug.

        Only this loop's stages are touched here: asyncio's tasks and futures may be handled only on
        their own loop's thread, and another loop's callers may still be waiting on theirs."""
        loop = asyncio.get_running_loop()
        with self._states_lock:
            for other in [other for other in self._states if other.is_closed()]:
                self._states.pop(other).prepared.put(None)  # its model thread ends; nobody is left to answer
            old = self._states.get(loop)
            if old is not None and not old.ended:
                return old
            return self._start(loop, old)

    def _start(
        self, loop: asyncio.AbstractEventLoop, old: _LoopState[Item, Prepared] | None
    ) -> _LoopState[Item, Prepared]:
        """Stages for ``loop``, taking over ``old``'s waiting callers (its stages ended on a bug)."""
        state: _LoopState[Item, Prepared] = _LoopState(loop)
        if old is not None:
            for task in old.tasks:
                task.cancel()
            old.prepared.put(None)  # the old model thread, if alive, ends; the new one takes over
            state.waiting = old.waiting  # its callers are still waiting on this loop
        state.tasks = [loop.create_task(self._prepare_stage(state))]
        state.model = threading.Thread(target=self._model_loop, args=(state,), name=f"{self.name}-model", daemon=True)
        state.model.start()
        self._states[loop] = state
        return state

    async def _take(self, state: _LoopState[Item, Prepared]) -> list[_Waiting[Item]]:
        """The next batch: every live item waiting, up to ``max_batch``; waits for one if none is."""
        while True:
            overdue = time.monotonic() - self.max_wait_seconds
            batch: list[_Waiting[Item]] = []
            while state.waiting and len(batch) < self.max_batch:
                waiting = state.waiting.popleft()
                if waiting.future.done():
                    continue
                if waiting.since < overdue:
                    waiting.future.set_exception(ServiceUnavailable(f"{self.name} is overloaded"))
                    continue
                batch.append(waiting)
            if batch:
                return batch
            state.arrived.clear()
            await state.arrived.wait()

    async def _prepare_stage(self, state: _LoopState[Item, Prepared]) -> None:
        while True:
            await state.ahead.acquire()  # released when the model takes the batch prepared before
            batch = await self._take(state)
            try:
                prepared = await state.loop.run_in_executor(
                    self._prepare_thread, self._prepare, [w.item for w in batch]
                )
            except Exception as exc:  # this batch's callers get the error; the stage goes on
                log.exception("%s: preparing a batch of %d failed", self.name, len(batch))
                _fail(batch, exc)
                state.ahead.release()
                continue
            state.prepared.put((batch, prepared))

    def _model_loop(self, state: _LoopState[Item, Prepared]) -> None:
        """The model thread: each prepared batch as soon as the last is done, results to the loop."""
        while (taken := state.prepared.get()) is not None:
            if not self._run_batch(state, *taken):
                return
            # Hold nothing while waiting: a batch's device tensors must be freed here, not by
            # whatever clears this thread's frame later (a forked child, where CUDA cannot run).
            del taken

    def _run_batch(self, state: _LoopState[Item, Prepared], batch: list[_Waiting[Item]], prepared: Prepared) -> bool:
        """Runs one batch and hands its rows (or its error) to the loop; False once the loop is closed."""
        try:
            state.loop.call_soon_threadsafe(state.ahead.release)  # the prepare stage may take the next batch
            try:
                rows = self._run(prepared)
                if len(rows) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(rows)} rows for a batch of {len(batch)}")
            except Exception as exc:
                log.exception("%s: the model failed on a batch of %d", self.name, len(batch))
                traceback.clear_frames(exc.__traceback__)  # its frames hold the batch's device tensors
                state.loop.call_soon_threadsafe(_fail, batch, exc)
                return True
            state.loop.call_soon_threadsafe(_deliver, batch, rows)
            return True
        except RuntimeError:  # the loop is closed: nobody waits for these rows any more
            log.debug("%s: event loop closed; model thread leaves its state", self.name)
            return False


def _deliver(batch: Sequence[_Waiting[Any]], rows: np.ndarray) -> None:
    for waiting, row in zip(batch, rows, strict=True):
        if not waiting.future.done():
            waiting.future.set_result(row)
