"""Continuous batching of Whisper windows: windows join and leave the running batch at any step.

Why: a batch decoded as a whole runs until its longest window ends, and a window that arrives
meanwhile waits for all of it. At large-v3 shapes on an H200, 32 concurrent recordings
(101 windows) went to the GPU in batches of 1, 1, 50 and 49 windows, each costing 224 decoder
steps: the batches of one cost as much time as the full ones. Here every window has a row
of the static decoder's cache (``services.whisper.static_decoder``) and its own position; a
new window's prompt is run (prefill) between two steps and it decodes from the next step on,
beside the windows already running; a window that ends frees its row at once. The GPU runs
one step for every window in flight, as vLLM's scheduler does for text.

Each row follows openai-whisper's ``DecodingTask`` exactly: the same initial tokens, logit
filters (``services.whisper.logit_filters``, per row), greedy choice or sampling, length
limits and result fields; ``tests/unit/whisper/test_decode_engine.py`` checks the tokens
against ``whisper.decode`` for windows that join at different steps. Windows the engine does
not take (beam search, best-of, an unknown language) decode as a batch of their own
(``services.whisper.decoding``).

torch and openai-whisper only (no BentoML), so ``bench/whisper_gpu.py`` measures this code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
from whisper.audio import N_FRAMES
from whisper.decoding import (
    DecodingOptions,
    DecodingResult,
    DecodingTask,
    SuppressBlank,
    SuppressTokens,
    detect_language,
)
from whisper.model import Whisper
from whisper.tokenizer import get_tokenizer
from whisper.utils import compression_ratio

from services.whisper.logit_filters import apply_timestamp_rules
from services.whisper.static_decoder import PREFILL_ROWS, DecoderCache, StaticDecoder

log = logging.getLogger(__name__)

# Cached positions a step reads come in multiples of this: with all 448, self-attention read
# 23% of a step's keys and values at large-v3 (the rest is cross-attention's 1,500 frames),
# while a window's tokens sit in the first 100 to 230 positions.
KEY_STEP = 64


@dataclass(frozen=True)
class _Plan:
    """What openai-whisper's ``DecodingTask`` derives from one set of options and a language."""

    task: DecodingTask
    suppress: tuple[int, ...]
    suppress_blank: bool
    timestamps: bool
    max_initial: int  # -1: no limit


@dataclass
class _Detection:
    window: torch.Tensor  # a log-mel, n_mels x 3000
    future: Future[dict[str, float]]


@dataclass
class _Row:
    window: torch.Tensor  # a log-mel, n_mels x 3000
    options: DecodingOptions  # with the window's language
    future: Future[DecodingResult]
    plan: _Plan | None = None
    slot: int = -1
    no_speech_prob: float = float("nan")


class DecodeEngine:
    """Decodes submitted windows on ``decoder``'s shared cache, one row each, on a thread of its own,
    and detects the language of windows submitted for it between two steps, beside the prefills.

    ``lock`` is held around every use of the model (a step, a prefill, a detection), so other model
    calls of the service (word alignment) run between steps, not behind whole decodes.
    """

    def __init__(
        self,
        model: Whisper,
        decoder: StaticDecoder,
        lock: threading.Lock,
        steps_between_checks: int = 4,
        on_admitted: Callable[[int], None] | None = None,
        on_steps: Callable[[float], None] | None = None,
        on_detected: Callable[[int, float], None] | None = None,
    ) -> None:
        """``on_admitted(windows)`` after each prefill, ``on_steps(seconds)`` after each round of steps,
        ``on_detected(windows, seconds)`` after each pass of language detection (metrics)."""
        self.model, self.decoder, self.lock = model, decoder, lock
        self.steps_between_checks = steps_between_checks
        self.on_admitted, self.on_steps, self.on_detected = on_admitted, on_steps, on_detected
        self.capacity = decoder.cache.rows
        device, rows, n_ctx = decoder.device, self.capacity, model.dims.n_text_ctx
        vocabulary = model.dims.n_vocab

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        # Per row: every token so far (initial, then sampled: one spare column past the context,
        # as the package's loop may hold n_ctx + 1 tokens when it stops), the count, the first
        # sampled position, and what the row's options ask of the filters and the sampler.
        self.history = zeros(rows, n_ctx + 1)
        self.length, self.sample_begin, self.sampled = zeros(rows), zeros(rows), zeros(rows)
        self.sample_len, self.max_initial = zeros(rows), zeros(rows)
        self.live = zeros(rows, dtype=torch.bool)
        self.timestamps, self.suppress_blank = zeros(rows, dtype=torch.bool), zeros(rows, dtype=torch.bool)
        self.suppress = zeros(rows, vocabulary, dtype=torch.bool)
        self.temperature = zeros(rows, dtype=torch.float32)
        self.sum_logprobs = zeros(rows, dtype=torch.float32)
        self._rows: list[_Row | None] = [None] * rows
        self._waiting: deque[_Row] = deque()
        self._detections: deque[_Detection] = deque()
        self._arrived = threading.Condition()
        self._sampling = False  # whether any live row samples (the greedy path skips the sampler)
        self._plans: dict[str, _Plan] = {}
        # The special tokens the filters use are the same for every language and task.
        self.tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
        self._blank = torch.zeros(vocabulary, dtype=torch.bool, device=device)  # SuppressBlank's tokens
        self._blank[self.tokenizer.encode(" ") + [self.tokenizer.eot]] = True
        # A step reads the cached positions up to the longest row's (rounded up to KEY_STEP), not
        # all n_ctx: the longest length in use is known here without asking the GPU, since a row
        # grows by one token a step at most.
        self.key_lengths = sorted({*range(KEY_STEP, n_ctx, KEY_STEP), n_ctx})
        self._length_bound = [0] * rows
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="whisper-decode", daemon=True)
        self._thread.start()

    @staticmethod
    def takes(options: DecodingOptions, language: str | None) -> bool:
        """Whether the engine decodes these options (else the caller decodes them as a batch)."""
        return language is not None and options.beam_size is None and options.best_of in (None, 1)

    def submit(self, window: torch.Tensor, options: DecodingOptions, language: str) -> Future[DecodingResult]:
        self._check_window(window)
        row = _Row(window, replace(options, language=language), Future())
        with self._arrived:
            self._check_running()
            self._waiting.append(row)
            self._arrived.notify()
        return row.future

    def detect(self, windows: Sequence[torch.Tensor]) -> list[Future[dict[str, float]]]:
        """The language probabilities of each log-mel window, as ``whisper.decoding.detect_language``
        gives them. On the engine's thread, so that a detection neither waits for a batcher's window
        nor contends with the steps for the model: they run at the next check, with every detection
        then waiting, before that check's prefills."""
        for window in windows:
            self._check_window(window)
        detections = [_Detection(window, Future()) for window in windows]
        with self._arrived:
            self._check_running()
            self._detections.extend(detections)
            self._arrived.notify()
        return [detection.future for detection in detections]

    def _check_window(self, window: torch.Tensor) -> None:
        """Refuse a window of the wrong shape here: in a pass it would fail the other windows with it."""
        shape = (self.model.dims.n_mels, N_FRAMES)
        if tuple(window.shape) != shape:
            raise ValueError(f"a window is a log-mel of shape {shape}, not {tuple(window.shape)}")

    def _check_running(self) -> None:
        if self._stopping:
            raise RuntimeError("the Whisper decode engine has stopped")

    def stop(self) -> None:
        """End the engine's thread once every window in flight is answered, letting go of the model
        and the cache (a process that goes on using the GPU without it: the benchmark, the tests)."""
        with self._arrived:
            self._stopping = True
            self._arrived.notify()
        self._thread.join()

    @property
    def in_flight(self) -> int:
        return sum(row is not None for row in self._rows) + len(self._waiting)

    # The loop

    def _serve(self) -> None:
        try:
            while True:
                with self._arrived:
                    while not self._waiting and not self._detections and not any(self._rows):
                        if self._stopping:
                            return
                        self._arrived.wait()
                try:
                    self._detect()
                    started = time.perf_counter()
                    with torch.no_grad():
                        self._admit()
                        with self.lock:
                            size = self._step_size()
                            for _ in range(self.steps_between_checks if size else 0):
                                self._step(size, self._keys_read())
                        self._finish()
                    if size:
                        _notify(self.on_steps, time.perf_counter() - started)
                except Exception as exc:  # every window in flight gets the error; the engine goes on
                    log.exception("Whisper decode engine failed")
                    self._fail_all(exc)
        finally:  # stopped, or a failure the loop could not survive: nothing may wait on it forever
            self._close()

    def _close(self) -> None:
        with self._arrived:
            self._stopping = True
            left: list[_Row | _Detection] = [*self._waiting, *self._detections]
            self._waiting.clear()
            self._detections.clear()
        left += [row for row in self._rows if row is not None]
        for job in left:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the Whisper decode engine has stopped"))

    def _detect(self) -> None:
        """Every detection waiting, at most ``PREFILL_ROWS`` windows a pass (the encoder's memory)."""
        with self._arrived:
            detections = [d for d in self._detections if d.future.set_running_or_notify_cancel()]
            self._detections.clear()
        for first in range(0, len(detections), PREFILL_ROWS):
            part = detections[first : first + PREFILL_ROWS]
            started = time.perf_counter()
            try:
                mels = torch.stack([d.window for d in part]).to(self.decoder.device, self.decoder.dtype)
                with self.lock, torch.no_grad():
                    _, probabilities = detect_language(self.model, mels)
            except Exception as exc:  # these windows get the error; the rows decoding go on
                log.exception("Whisper language detection failed")
                for detection in part:
                    detection.future.set_exception(exc)
                continue
            for detection, language_probabilities in zip(part, probabilities, strict=True):
                detection.future.set_result(language_probabilities)
            _notify(self.on_detected, len(part), time.perf_counter() - started)

    def _free_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self._rows) if row is None]

    def _admit(self) -> None:
        """Prefill waiting windows into free rows: encoder, cross-attention keys, initial tokens."""
        free = self._free_slots()
        admitted: list[_Row] = []
        with self._arrived:
            while self._waiting and len(admitted) < len(free):
                row = self._waiting.popleft()
                if row.future.set_running_or_notify_cancel():
                    admitted.append(row)
        if not admitted:
            return
        for row, slot in zip(admitted, free, strict=False):
            row.slot, row.plan = slot, self._plan(row.options)
            self._rows[slot] = row
        # Windows whose initial tokens have the same length prefill together.
        groups: dict[int, list[_Row]] = {}
        for row in admitted:
            assert row.plan is not None
            groups.setdefault(len(row.plan.task.initial_tokens), []).append(row)
        with self.lock:
            no_speech = [
                (part, self._prefill(part, length))
                for length, rows in groups.items()
                for part in (rows[first : first + PREFILL_ROWS] for first in range(0, len(rows), PREFILL_ROWS))
            ]
            # Read once every prefill is queued: a read waits for the GPU, and the next prefill's
            # launches would wait behind it (and, in the service, behind the event loop for the GIL).
            for part, probabilities in no_speech:
                for row, probability in zip(part, probabilities.tolist(), strict=True):
                    row.no_speech_prob = probability
        _notify(self.on_admitted, len(admitted))

    def _prefill(self, rows: list[_Row], length: int) -> torch.Tensor:
        """Prefill ``rows`` (initial tokens of ``length``) into their slots; their no-speech
        probabilities, on the device. Each row's state is written for all rows at once, from host
        tensors copied without waiting: none of it stops the GPU's queue."""
        device, decoder = self.decoder.device, self.decoder
        plans = [row.plan for row in rows if row.plan is not None]
        assert len(plans) == len(rows)
        mels = torch.stack([row.window for row in rows]).to(device, decoder.dtype, non_blocking=True)
        audio_features = self.model.encoder(mels)
        initial = _to(device, torch.tensor([plan.task.initial_tokens for plan in plans]))
        scratch = DecoderCache(self.model.dims, len(rows), decoder.dtype, device, text_positions=length)
        logits = decoder.prefill(scratch, initial, audio_features)
        slots = _to(device, torch.tensor([row.slot for row in rows]))
        decoder.place(scratch, slots, length)
        no_speech = self._no_speech_probs(plans, logits)

        suppress = torch.zeros(len(rows), self.suppress.shape[1], dtype=torch.bool)
        for i, plan in enumerate(plans):
            suppress[i, list(plan.suppress)] = True
        per_row = torch.tensor([[plan.task.sample_len, plan.max_initial] for plan in plans])
        flags = torch.tensor([[plan.timestamps, plan.suppress_blank] for plan in plans])
        temperatures = torch.tensor([row.options.temperature for row in rows], dtype=torch.float32)
        per_row, flags, suppress, temperatures = (_to(device, t) for t in (per_row, flags, suppress, temperatures))
        self.history[slots, :length] = initial
        self.length[slots] = length
        self.sample_begin[slots] = length
        self.sampled[slots] = 0
        self.sample_len[slots], self.max_initial[slots] = per_row[:, 0], per_row[:, 1]
        self.timestamps[slots], self.suppress_blank[slots] = flags[:, 0], flags[:, 1]
        self.suppress[slots] = suppress
        self.temperature[slots] = temperatures
        self.sum_logprobs[slots] = 0.0
        self.live[slots] = True
        for row in rows:
            self._length_bound[row.slot] = length + 1  # the token _advance appends below
        self._sampling = any(row is not None and row.options.temperature > 0 for row in self._rows)
        self._advance(slots, logits[:, -1])
        return no_speech

    def _no_speech_probs(self, plans: list[_Plan], logits: torch.Tensor) -> torch.Tensor:
        """The package's no-speech probability of each row: its ``<|nospeech|>`` at the start of transcript."""
        device = logits.device
        rows = _to(device, torch.arange(len(plans)))
        no_speech = [plan.task.tokenizer.no_speech for plan in plans]
        sot = _to(device, torch.tensor([plan.task.sot_index for plan in plans]))
        token = _to(device, torch.tensor([-1 if t is None else t for t in no_speech]))
        at_sot = logits[rows, sot].float().softmax(dim=-1)
        probabilities = at_sot[rows, token.clamp(min=0)]
        return torch.where(token >= 0, probabilities, torch.nan)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture a whole greedy step (decoder, filters, choice, bookkeeping) at each batch size as
        one CUDA graph: with the step's few hundred small operations replayed at once, the GPU
        never waits on Python. Only before the first window (nothing may be decoding)."""
        if not self.decoder.use_graphs:
            return
        try:
            self._capture()
        except Exception:  # the steps then run eagerly: slower, the same tokens
            log.exception("capturing the decode step failed; decoding without CUDA graphs")
            self._graphs.clear()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        shapes = [(size, keys) for size in reversed(self.decoder.sizes) for keys in reversed(self.key_lengths)]
        with torch.cuda.stream(stream):  # warm-up outside the capture; with no row live, a step changes nothing
            for size, keys in shapes:
                self._step_rows(size, keys)
        torch.cuda.current_stream().wait_stream(stream)
        for size, keys in shapes:  # largest first: the smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.decoder.pool):
                self._step_rows(size, keys)
            self._graphs[size, keys] = graph

    def _step_size(self) -> int:
        """The smallest captured batch size that holds every row in use (0: none is); rows change only
        at a prefill or a check, so one size serves the steps between them."""
        used = [slot for slot, row in enumerate(self._rows) if row is not None]
        return self.decoder.size_for(used[-1] + 1) if used else 0

    def _keys_read(self) -> int:
        """How many cached positions the next step reads: the longest row in use, rounded up."""
        longest = max((bound for bound, row in zip(self._length_bound, self._rows, strict=True) if row), default=1)
        return next((keys for keys in self.key_lengths if keys >= longest), self.key_lengths[-1])

    def _step(self, size: int, keys: int) -> None:
        """One token for every row in use, the first ``size`` rows at once, reading ``keys`` positions."""
        if (size, keys) in self._graphs and not self._sampling:
            self._graphs[size, keys].replay()
        else:
            self._step_rows(size, keys)
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._length_bound[slot] += 1

    def _step_rows(self, size: int, keys: int) -> None:
        live = self.live[:size]
        last = self.history[:size].gather(1, (self.length[:size] - 1).clamp(min=0)[:, None])
        positions = torch.where(live, self.length[:size] - 1, 0)  # rows not in use: a harmless write at 0
        tokens = torch.where(live[:, None], last, 0)
        logits = self.decoder.forward(self.decoder.cache, tokens, positions, length=keys, per_row=True)
        self._advance(slice(0, size), logits[:, -1])

    def _advance(self, slots: torch.Tensor | slice, logits: torch.Tensor) -> None:
        """The package's filters and choice on each row's logits, then its next token appended
        (state written in place: a slice of rows in a captured step, given rows at a prefill)."""
        live = self.live[slots]
        length, sample_begin = self.length[slots], self.sample_begin[slots]
        history = self.history[slots]
        first = length == sample_begin
        logits.masked_fill_(self.suppress[slots], -torch.inf)  # SuppressBlank comes first in the package,
        blank = first & self.suppress_blank[slots]  # but both only mask: the order does not matter
        logits.masked_fill_(blank[:, None] & self._blank, -torch.inf)
        tokenizer = self.tokenizer
        apply_timestamp_rules(
            logits, history, sample_begin, length, self.max_initial[slots], self.timestamps[slots], tokenizer
        )
        next_tokens = logits.argmax(dim=-1)
        if self._sampling:
            temperature = self.temperature[slots]
            sampling = temperature > 0
            scaled = logits / torch.where(sampling, temperature, 1.0)[:, None]
            sampled = torch.distributions.Categorical(logits=scaled).sample()
            next_tokens = torch.where(sampling, sampled, next_tokens)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        # Everything from the state before any of it is written: with a slice, the reads are views.
        sampled = self.sampled[slots] + live
        ended = (next_tokens == tokenizer.eot) | (sampled >= self.sample_len[slots])
        ended |= length + 1 > self.model.dims.n_text_ctx
        still_live, grown = live & ~ended, length + live
        at = length.clamp(max=self.history.shape[1] - 1)
        kept = history.gather(1, at[:, None])[:, 0]
        appended = history.scatter(1, at[:, None], torch.where(live, next_tokens, kept)[:, None])
        self.sum_logprobs[slots] += torch.where(live, logprobs.gather(1, next_tokens[:, None])[:, 0], 0.0)
        self.history[slots] = appended
        self.length[slots] = grown
        self.sampled[slots] = sampled
        self.live[slots] = still_live

    def _finish(self) -> None:
        """Answer the windows that ended, and free their rows."""
        live = self.live.tolist()
        for slot, row in enumerate(self._rows):
            if row is None or live[slot]:
                continue
            self._rows[slot] = None
            if not row.future.cancelled():
                row.future.set_result(self._result(row))

    def _result(self, row: _Row) -> DecodingResult:
        assert row.plan is not None
        task, slot = row.plan.task, row.slot
        begin, length = int(self.sample_begin[slot]), int(self.length[slot])
        tokens = self.history[slot, begin:length].tolist()
        eot = task.tokenizer.eot
        tokens = tokens[: tokens.index(eot)] if eot in tokens else tokens
        text = task.tokenizer.decode(tokens).strip()
        return DecodingResult(
            audio_features=torch.empty(0),
            language=row.options.language,
            tokens=tokens,
            text=text,
            avg_logprob=float(self.sum_logprobs[slot]) / (len(tokens) + 1),
            no_speech_prob=row.no_speech_prob,
            temperature=row.options.temperature,
            compression_ratio=compression_ratio(text),
        )

    def _fail_all(self, exc: BaseException) -> None:
        self.live.zero_()
        for slot, row in enumerate(self._rows):
            if row is not None and not row.future.done():
                row.future.set_exception(exc)
            self._rows[slot] = None

    # What the package derives from options

    def _plan(self, options: DecodingOptions) -> _Plan:
        key = repr(options)
        if key not in self._plans:
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = _plan(self.model, options)
        return self._plans[key]


def _to(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor on ``device``, the copy queued without waiting for the GPU (a pageable source
    is staged before the call returns, so the host tensor may go at once)."""
    return tensor.to(device, non_blocking=True)


def _notify(callback: Callable[..., None] | None, *args: float) -> None:
    """A metrics callback; one that fails is logged and fails no window."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("a Whisper decode engine callback failed")


def _plan(model: Whisper, options: DecodingOptions) -> _Plan:
    task = DecodingTask(model, options)
    suppress: tuple[int, ...] = ()
    suppress_blank = False
    for logit_filter in task.logit_filters:
        if isinstance(logit_filter, SuppressTokens):
            suppress = tuple(logit_filter.suppress_tokens)
        elif isinstance(logit_filter, SuppressBlank):
            suppress_blank = True
    timestamps = not options.without_timestamps
    max_initial = -1
    if timestamps:
        rules = task.logit_filters[-1]
        index = getattr(rules, "max_initial_timestamp_index", None)
        max_initial = -1 if index is None else index
    return _Plan(task, suppress, suppress_blank, timestamps, max_initial)
