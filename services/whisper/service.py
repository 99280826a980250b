"""Whisper model service: openai-whisper's model, decoding 30-second windows from every request together.

Whisper hears audio in fixed 30-second log-mel windows. This service holds the model and nothing
else: the per-request algorithm (``whisper.transcribe``'s seeking, fallbacks and timestamp rules)
runs in the entry service (``services.whisper.api``), which sends each window it needs decoded
here, from different requests and from the chunks of one long recording alike.

On a GPU, by default (``MULTIMODAL_WHISPER_DECODER=continuous``), each window joins the batch running on the
model at the next step and leaves it when it ends (``services.whisper.decode_engine``), over a KV
cache of fixed size whose every step is one CUDA graph on a GPU (``services.whisper.static_decoder``).
``static`` decodes BentoML's batches whole on the same cache, grouped by ``DecodingOptions``;
``reference`` runs openai-whisper's own step loop, launch-bound on a GPU, the default on a CPU. Windows in different
languages share a pass, each row starting with its own language token. Every window gets the
tokens it gets alone: rows never interact. With the continuous decoder, language detection runs on
the engine's thread too, between two steps (``DecodeEngine.detect``), rather than behind BentoML's
batcher and the engine's hold on the model.

On a GPU, the Linear, Conv1d and Embedding weights are stored in fp16 once: openai-whisper
otherwise casts fp32 parameters to fp16 on every forward, which makes a decoder step ~3x slower
(57 ms against 16-17 ms at large-v3 shapes on an H200, measured in session 5); LayerNorm stays
fp32, as openai-whisper computes it in fp32 anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import torch
import whisper
from whisper.decoding import DecodingOptions, DecodingResult, detect_language
from whisper.timing import find_alignment
from whisper.tokenizer import get_tokenizer

from configuration.profiles import model_spec
from configuration.settings import get_settings
from services.common import metrics
from services.common.device import torch_device, uses_gpu
from services.common.garbage_collection import freeze_start_up_objects
from services.common.model_service import batched_api, model_service
from services.common.own_listening_socket import listen_on_own_socket_when_ready
from services.common.shutdown_grace import keep_serving_while_callers_drain
from services.whisper.alignment_heads import set_stored_alignment_heads
from services.whisper.decode_engine import DecodeEngine
from services.whisper.decoding import BatchDecodingTask
from services.whisper.protocol import AlignJob, Mel, WhisperModelCard, WindowJob, WindowResult, WordTiming
from services.whisper.static_decoder import PREFILL_ROWS, StaticDecoder

log = logging.getLogger(__name__)
settings = get_settings()
# On a CPU, openai-whisper's own loop is the fastest (a step there is the model's arithmetic, not
# kernel launches); on a GPU, windows join the running batch step by step.
DECODER = settings.whisper_decoder
if DECODER == "auto":
    DECODER = "continuous" if uses_gpu() else "reference"
# Batches of 30-second windows from every request (a plain API at a max batch size of 1).
window_api = batched_api(settings.whisper_max_batch_size, settings.whisper_max_latency_ms)

CHECKPOINT = "model.pt"  # bentos.tiny.whisper writes it; bentos.import_models renames downloads to it


@model_service("Whisper")
class Whisper:
    model_ref = bentoml.models.BentoModel(model_spec("whisper").tag)

    def __init__(self) -> None:
        keep_serving_while_callers_drain()  # a transcription's windows span a SIGTERM: common/shutdown_grace.py
        self.device = torch_device()
        self.model = whisper.load_model(str(Path(self.model_ref.path) / CHECKPOINT), device=self.device).eval()
        # load_model sets the published alignment heads only for a model name, not a file:
        # they come from the store (services.whisper.alignment_heads). Only their indices are
        # read, so the mask may stay on the CPU.
        metadata = self.model_ref.info.metadata
        if not set_stored_alignment_heads(self.model, metadata) and metadata.get("source") != "generated":
            log.warning(
                "%s stores no alignment heads: word timings use the default heads; re-import it with --force",
                self.model_ref.tag,
            )
        self.fp16 = self.device.type == "cuda"
        if self.fp16:
            for module in self.model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
                    module.half()
        self.dtype = torch.float16 if self.fp16 else torch.float32
        # Model calls run one at a time (BentoML's default of one thread per service does so
        # too): find_alignment hooks the decoder's cross-attention, and a decode running
        # beside it would feed those hooks. The engine takes the lock step by step.
        self._lock = threading.Lock()
        self.static_decoder: StaticDecoder | None = None
        self.engine: DecodeEngine | None = None
        if DECODER != "reference":
            self.static_decoder = StaticDecoder(
                self.model, settings.whisper_max_batch_size, self.dtype, use_graphs=self.device.type == "cuda"
            )
        if DECODER == "continuous":
            assert self.static_decoder is not None
            self.engine = DecodeEngine(
                self.model,
                self.static_decoder,
                self._lock,
                on_admitted=self._admitted,
                on_steps=self._stepped,
                on_detected=self._detected,
            )
        self._warm_up()
        dims = asdict(self.model.dims)
        self.card = WhisperModelCard(
            model=str(self.model_ref.tag.name),
            revision=str(self.model_ref.tag.version),
            device=str(self.device),
            dims=dims,
            multilingual=self.model.is_multilingual,
            num_languages=self.model.num_languages,
            mel_dtype="float16" if self.fp16 else "float32",
        )
        log.info("Whisper %s on %s (%s)", self.model_ref.tag, self.device, self.dtype)
        freeze_start_up_objects(settings.freeze_start_up_objects)  # common/garbage_collection.py
        listen_on_own_socket_when_ready()  # loaded: take connections (services/common/own_listening_socket.py)

    def _mels(self, mels: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(mels)).to(self.device, self.dtype)

    def _options(self, options: dict[str, Any]) -> DecodingOptions:
        known = {f.name for f in fields(DecodingOptions)}
        # The caller does not know this process's precision; the weights decide it.
        return DecodingOptions(**{**{k: v for k, v in options.items() if k in known}, "fp16": self.fp16})

    def _observe(self, kind: str, size: int, started: float) -> None:
        metrics.WHISPER_BATCH_SIZE.labels(kind).observe(size)
        metrics.WHISPER_BATCH_DURATION.labels(kind).observe(time.perf_counter() - started)
        metrics.record_gpu()

    def _group_key(self, options: dict[str, Any]) -> str:
        """Windows whose options differ only in a given language decode together."""
        if self.model.is_multilingual and options.get("language") is not None:
            options = {k: v for k, v in options.items() if k != "language"}
        return json.dumps(options, sort_keys=True, default=str)

    def _warm_up(self) -> None:
        """Capture the decoder's step graphs, and decode once at each graph's batch size: the first
        pass at a new size pays the GPU libraries' set-up (0.1-0.2 s at large-v3 shapes on an H200)."""
        if self.device.type != "cuda" or self.static_decoder is None:
            return
        started = time.perf_counter()
        silence = torch.zeros(settings.whisper_max_batch_size, self.model.dims.n_mels, 3000)
        options = DecodingOptions(language="en", sample_len=2, fp16=True)
        with torch.no_grad():
            if self.engine is not None:
                self.engine.capture()
            else:
                self.static_decoder.capture()
            for rows in self.static_decoder.sizes:
                if self.engine is not None:
                    futures = [self.engine.submit(window, options, "en") for window in silence[:rows]]
                    for future in futures:
                        future.result()
                    if self.model.is_multilingual and rows <= PREFILL_ROWS:  # detection's encoder passes too
                        for detection in self.engine.detect(list(silence[:rows])):
                            detection.result()
                else:
                    BatchDecodingTask(self.model, options, static_decoder=self.static_decoder).run(
                        silence[:rows].to(self.device, self.dtype)
                    )
        log.info("Whisper decoder warmed up in %.1f s", time.perf_counter() - started)

    def _admitted(self, windows: int) -> None:
        metrics.WHISPER_BATCH_SIZE.labels("decode").observe(windows)

    def _stepped(self, seconds: float) -> None:
        metrics.WHISPER_BATCH_DURATION.labels("decode").observe(seconds)
        metrics.record_gpu()

    def _detected(self, windows: int, seconds: float) -> None:
        metrics.WHISPER_BATCH_SIZE.labels("detect_language").observe(windows)
        metrics.WHISPER_BATCH_DURATION.labels("detect_language").observe(seconds)
        metrics.record_gpu()

    def _decode(self, mel: torch.Tensor, options: DecodingOptions, languages: list[str | None]) -> list[DecodingResult]:
        given = languages if self.model.is_multilingual and None not in languages else None
        # The continuous engine owns the static decoder's cache: windows it does not take run the package's loop.
        batch_decoder = self.static_decoder if self.engine is None else None
        return BatchDecodingTask(self.model, options, given, batch_decoder).run(mel)  # type: ignore[arg-type]

    async def _decode_continuously(self, jobs: list[WindowJob]) -> list[WindowResult]:
        """Each window the engine takes joins the running batch; the others decode as one batch."""
        assert self.engine is not None
        waiting: dict[int, asyncio.Future[DecodingResult]] = {}
        rest: list[int] = []
        for i, job in enumerate(jobs):
            options = self._options(job.options)
            if self.engine.takes(options, options.language):
                mel = torch.from_numpy(np.asarray(job.mel))  # in the card's mel_dtype; the engine casts it
                waiting[i] = asyncio.wrap_future(self.engine.submit(mel, options, options.language))
            else:
                rest.append(i)
        results: list[WindowResult | None] = [None] * len(jobs)
        if rest:
            decoded_apart = await asyncio.to_thread(self._decode_batch, [jobs[i] for i in rest])
            for i, result in zip(rest, decoded_apart, strict=True):
                results[i] = result
        for i, decoded in zip(waiting, await asyncio.gather(*waiting.values()), strict=True):
            results[i] = _window_result(decoded)
        return results  # type: ignore[return-value]

    if DECODER == "continuous":

        @bentoml.api
        async def decode_windows(self, jobs: list[WindowJob]) -> list[WindowResult]:
            """Decode windows from any number of requests, each joining the batch running on the GPU."""
            return await self._decode_continuously(jobs)

    else:

        @window_api
        def decode_windows(self, jobs: list[WindowJob]) -> list[WindowResult]:
            """Decode windows from any number of requests: one batched pass per set of options."""
            return self._decode_batch(jobs)

    def _decode_batch(self, jobs: list[WindowJob]) -> list[WindowResult]:
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(self._group_key(job.options), []).append(i)
        results: list[WindowResult | None] = [None] * len(jobs)
        for indices in groups.values():
            started = time.perf_counter()
            options = self._options(jobs[indices[0]].options)
            languages = [jobs[i].options.get("language") for i in indices]
            with self._lock, torch.no_grad():
                decoded = self._decode(self._mels([jobs[i].mel for i in indices]), options, languages)
            for i, result in zip(indices, decoded, strict=True):
                results[i] = _window_result(result)
            self._observe("decode", len(indices), started)
        return results  # type: ignore[return-value]

    if DECODER == "continuous":

        @bentoml.api
        async def detect_language(self, mels: list[Mel]) -> list[dict[str, float]]:
            """Language probabilities of each window (``whisper.decoding.detect_language``), detected by the
            engine between two steps with every other window then waiting for it."""
            assert self.engine is not None
            engine = self.engine
            detections = engine.detect([torch.from_numpy(np.asarray(mel)) for mel in mels])
            return list(await asyncio.gather(*map(asyncio.wrap_future, detections)))

    else:

        @window_api
        def detect_language(self, mels: list[Mel]) -> list[dict[str, float]]:
            """Language probabilities of each window (``whisper.decoding.detect_language``, batched)."""
            started = time.perf_counter()
            with self._lock, torch.no_grad():
                _, probabilities = detect_language(self.model, self._mels(mels))
            self._observe("detect_language", len(mels), started)
            return probabilities

    @bentoml.api
    def align_words(self, job: AlignJob) -> list[WordTiming]:
        """Word timings of one window's text from cross-attention and DTW (``find_alignment``)."""
        tokenizer = get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages, language=job.language, task=job.task
        )
        mel = torch.from_numpy(np.array(job.mel)).to(self.device, self.dtype)
        with self._lock:
            timings = find_alignment(
                self.model, tokenizer, job.text_tokens, mel, job.num_frames,
                medfilt_width=job.medfilt_width, qk_scale=job.qk_scale,
            )  # fmt: skip
        return [
            WordTiming(word=t.word, tokens=t.tokens, start=t.start, end=t.end, probability=t.probability)
            for t in timings
        ]

    @bentoml.api
    def describe(self) -> WhisperModelCard:
        return self.card


def _window_result(result: DecodingResult) -> WindowResult:
    return WindowResult(
        language=result.language,
        tokens=result.tokens,
        text=result.text,
        avg_logprob=result.avg_logprob,
        no_speech_prob=result.no_speech_prob,
        temperature=result.temperature,
        compression_ratio=result.compression_ratio,
    )
