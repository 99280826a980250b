"""Whisper end to end through ``bentoml serve`` against openai-whisper itself, in one run.

    python -m bench.whisper_gpu speech --out .speech          # here: espeak-ng speech, carried to the GPU machine
    python -m bench.whisper_gpu run --speech .speech --out bench/results   # on the GPU machine

Steps of ``run``, all in one process and the server it starts:
1. Writes a Whisper of large-v3's shape with random weights into a fresh model store, under the
   production tag (no hub is reachable; speed does not depend on the weights' values).
2. The decode path in this process, on log-mels of speech: openai-whisper's ``decode`` one
   window at a time (fp16 weights stored once); its step loop over a batch of 16 windows (the
   service's `reference` decoder); the static decoder with CUDA graphs at batches 1 to 64 (its
   graph replay alone, and the kernels of one step); the continuous engine (the service's
   default) with 64 windows at once and in a stream; and whether they give the package's tokens.
3. openai-whisper's ``transcribe``, one recording after another: as the package ships it
   (``load_model``'s fp32 weights cast to fp16 on every forward) and with fp16 weights stored.
4. ``bentoml serve`` with only Whisper and each decoder of --decoders, then rounds of 32
   concurrent transcriptions of 30-120 s recordings (one round warms up), then (the first
   decoder only) 8 concurrent, then one at a time.

Every window decodes to openai-whisper's cap of 224 tokens, in every path: random weights never
pick end of text (the answers' tokens per window show it), so each path does the same work per
window and the comparison is not skewed by what the weights happen to say. A real model stops
at the end of the speech, about 100 tokens a window: real throughput is higher than this.

Recordings are sliced from about 10 minutes of espeak-ng speech (``speech``), so 32 of them are
all different and carry as one small FLAC. Results: ``whisper_gpu.json`` and a plot in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.clip_gpu import GpuSampler
from bench.serving import ServedProduct, py_spy

RATE = 16_000
POOL = "speech.flac"
LARGE_V3 = dict(
    n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
    n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32,
)  # fmt: skip
# A small model of the same layout, for a smoke run of this script on a machine without a GPU (--shape small).
SMALL = {**LARGE_V3, "n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 2, "n_text_state": 64,
         "n_text_head": 2, "n_text_layer": 2}  # fmt: skip
SHAPES = {"large-v3": LARGE_V3, "small": SMALL}
STAGES = "whisper_stage_duration_seconds"  # the entry service's histogram of a request's stages
VOICES = ["en", "en-us", "en-gb-scotland", "en-029"]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# Speech (here, where espeak-ng is installed)


def write_speech(folder: Path, minutes: float) -> Path:
    """About ``minutes`` of English prose spoken by espeak-ng in several voices and speeds, 16 kHz FLAC."""
    import soundfile

    from bench.whisper_long_audio import SENTENCES

    folder.mkdir(parents=True, exist_ok=True)
    parts: list[np.ndarray] = []
    seconds, index = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        while seconds < minutes * 60:
            text = " ".join(SENTENCES[(index * 3 + i) % len(SENTENCES)] for i in range(4))
            raw = Path(tmp) / "raw.wav"
            voice, speed = VOICES[index % len(VOICES)], 140 + 15 * (index % 4)
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
            wav = Path(tmp) / "speech.wav"
            resample = ["ffmpeg", "-y", "-loglevel", "error", "-i", str(raw), "-ar", str(RATE), "-ac", "1", str(wav)]
            subprocess.run(resample, check=True)
            audio, _ = soundfile.read(wav, dtype="float32")
            parts += [audio, np.zeros(int(RATE * (0.4 + 0.3 * (index % 3))), np.float32)]
            seconds += (len(audio) + len(parts[-1])) / RATE
            index += 1
            log(f"speech: {seconds:.0f} s")
    path = folder / POOL
    soundfile.write(path, np.concatenate(parts), RATE, format="FLAC")
    log(f"wrote {path}: {seconds:.0f} s, {path.stat().st_size / 1e6:.1f} MB")
    return path


def recordings(pool: np.ndarray, durations: list[float]) -> list[np.ndarray]:
    """Slices of the pool of the given durations, from spread-out starts (wrapping around), all different."""
    clips = []
    for i, seconds in enumerate(durations):
        length, start = int(seconds * RATE), int((i * 0.618034 % 1) * len(pool))
        clips.append(np.resize(np.roll(pool, -start), length))  # np.resize repeats the pool if needed
    return clips


def wav_bytes(audio: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# The model store


def write_model(home: Path, shape: str, seed: int = 0) -> Path:
    """A random-weight Whisper of ``shape`` under the production tag; its checkpoint's path."""
    os.environ["BENTOML_HOME"] = str(home)
    import bentoml
    import torch
    from whisper.model import ModelDimensions, Whisper

    from bentos.import_models import model_metadata
    from bentos.tiny.whisper import CHECKPOINT
    from configuration.profiles import model_spec
    from configuration.settings import Settings

    spec = model_spec("whisper", Settings(profile="production"))
    torch.manual_seed(seed)
    with torch.device(device()):
        model = Whisper(ModelDimensions(**SHAPES[shape]))
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(std=0.02)  # torch.empty otherwise
    state = {name: value.half() for name, value in model.state_dict().items()}  # as published: fp16
    labels = {"profile": "production", "family": "whisper", "architecture": spec.architecture}
    published = model_metadata(spec) if shape == "large-v3" else {}  # large-v3's alignment heads fit only it
    metadata = {**published, "source": f"random weights, {shape} shape", "seed": seed}
    with bentoml.models.create(spec.tag, labels=labels, metadata=metadata) as stored:
        torch.save({"dims": SHAPES[shape], "model_state_dict": state}, Path(stored.path) / CHECKPOINT)
    del model, state
    torch.cuda.empty_cache()
    log(f"wrote a random {shape} as {spec.tag}")
    return next((home / "models").glob(f"*/*/{CHECKPOINT}"))


# The decode path and transcribe, in this process


def synchronized(fn: Any) -> tuple[float, Any]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def half_weights(model: Any) -> None:
    """What ``services.whisper.service`` does on a GPU: Linear, Conv1d and Embedding weights in fp16."""
    import torch

    if not torch.cuda.is_available():
        return  # the CPU keeps fp32, as the service does
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
            module.half()


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How often two decoders give one window the same tokens, and how far they agree before they part."""

    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))

    return {
        "identical_windows": sum(x == y for x, y in zip(a, b, strict=True)) / len(a),
        "mean_common_prefix_fraction": float(
            np.mean([prefix(x, y) / max(len(x), len(y), 1) for x, y in zip(a, b, strict=True)])
        ),
    }


def step_replay_ms(decoder: Any, batch: int, repeats: int = 50) -> float:
    """One decoder step's graph alone, replayed: the GPU's own time per step, without the loop around it."""
    import torch

    tokens = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    seconds, _ = synchronized(lambda: [decoder.step(decoder.cache, tokens, 100) for _ in range(repeats)])
    return 1000 * seconds / repeats


def step_kernels(decoder: Any, batch: int, top: int = 12) -> list[tuple[str, float]]:
    """The GPU kernels of one eager decoder step (the graph replays the same ones), by total time in ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    position = torch.tensor([100], device="cuda")
    with torch.no_grad():
        decoder.forward(decoder.cache, tokens, position)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            for _ in range(5):
                decoder.forward(decoder.cache, tokens, position)
            torch.cuda.synchronize()
    rows = sorted(trace.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [(row.key[:90], round(row.device_time_total / 5 / 1000, 3)) for row in rows]


def cross_attention_backends(rows: int = 128, repeats: int = 50) -> dict[str, float]:
    """One decoder layer's cross-attention at large-v3 shapes for ``rows`` windows (a query of one
    token against 1,500 frames), laid out as the static decoder's cache holds it, by each way torch
    has to compute it: ms per call. Most of a step is this, 32 times (``step_kernels``)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    heads, frames, width = 20, 1500, 1280
    q = torch.randn(rows, 1, width, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(rows, frames, width, device="cuda", dtype=torch.float16) for _ in range(2))

    def split(x: torch.Tensor) -> torch.Tensor:  # as StaticDecoder._attend does
        return x.view(*x.shape[:2], heads, -1).permute(0, 2, 1, 3)

    def matmuls() -> torch.Tensor:  # two batched products, softmax in fp32
        weights = (split(q) @ split(k).transpose(-1, -2)) * (width // heads) ** -0.5
        return weights.float().softmax(dim=-1).to(q.dtype) @ split(v)

    ways: dict[str, Any] = {"default": lambda: scaled_dot_product_attention(split(q), split(k), split(v))}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):  # fmt: skip

        def way(backend: Any = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return scaled_dot_product_attention(split(q), split(k), split(v))

        ways[name] = way
    ways["matmuls"] = matmuls
    results: dict[str, float] = {}
    with torch.no_grad():
        reference = ways["math"]()
        for name, way in ways.items():
            try:
                error = (way() - reference).abs().max().item()
                seconds, _ = synchronized(lambda way=way: [way() for _ in range(repeats)])
            except RuntimeError as exc:  # a backend that does not take these shapes
                log(f"cross-attention, {name}: {str(exc).splitlines()[0][:120]}")
                continue
            results[name] = round(1000 * seconds / repeats, 4)
            log(f"cross-attention at {rows} rows, {name}: {results[name]} ms (max difference {error:.2g})")
    return results


def continuous_engine(model: Any, decoder: Any, mels: Any, options: Any, all_keys: bool = False) -> dict[str, Any]:
    """The service's default: every window submitted to the continuous engine at once, and then
    in a stream (a window every 20 ms), joining the rows already decoding. ``all_keys``: each step
    reads every cached position, as before the engine read up to the longest row's only."""
    import threading

    from services.whisper.decode_engine import DecodeEngine

    engine = DecodeEngine(model, decoder, threading.Lock())
    if all_keys:
        engine.key_lengths = [model.dims.n_text_ctx]
    seconds, _ = synchronized(engine.capture)
    log(f"continuous engine{' reading all keys' * all_keys}: whole steps captured in {seconds:.1f} s")

    def decode(gap_s: float) -> list[Any]:
        futures = []
        for mel in mels:
            futures.append(engine.submit(mel, options, "en"))
            time.sleep(gap_s)
        return [future.result() for future in futures]

    decode(0.0)  # warm-up: the first prefill at each size
    results: dict[str, Any] = {"capture_s": seconds}
    for name, gap_s in (("at_once", 0.0), ("every_20ms", 0.02)):
        seconds, decoded = synchronized(lambda gap_s=gap_s: decode(gap_s))
        results[name] = {"windows": len(decoded), "windows_per_s": len(decoded) / seconds, "seconds": seconds}
        rate = len(decoded) / seconds
        log(f"continuous engine{' reading all keys' * all_keys}, {len(decoded)} windows {name}: {rate:.1f} windows/s")
    results["tokens"] = [d.tokens for d in decoded]
    engine.stop()  # its thread holds the model and the cache: the served steps need the memory back
    return results


def decode_path(checkpoint: Path, clips: list[np.ndarray], batches: list[int], package: bool) -> dict[str, Any]:
    """The decode path in this process; ``package``: openai-whisper's own loops too (a minute of GPU time)."""
    import torch
    import whisper
    from whisper.decoding import DecodingOptions

    from services.whisper.decoding import BatchDecodingTask
    from services.whisper.static_decoder import StaticDecoder

    gpu = device() == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    model = whisper.load_model(str(checkpoint), device=device()).eval()
    half_weights(model)
    audio = torch.from_numpy(np.concatenate(clips)[: 32 * 30 * RATE].copy()).to(device())
    mels = torch.stack([
        whisper.log_mel_spectrogram(window, model.dims.n_mels) for window in audio.view(32, 30 * RATE)
    ]).to(dtype)  # fmt: skip
    options = DecodingOptions(language="en", fp16=gpu, temperature=0.0)  # transcribe's: timestamps on
    results: dict[str, Any] = {}

    def tokens(decoded: list[Any]) -> list[list[int]]:
        return [d.tokens for d in decoded]

    if package:
        whisper.decode(model, mels[0], DecodingOptions(language="en", fp16=gpu, sample_len=4))  # warm-up
        seconds, alone = synchronized(lambda: [whisper.decode(model, mel, options) for mel in mels[:2]])
        lengths = [len(t) for t in tokens(alone)]
        results["package_one_window_at_a_time"] = {"windows_per_s": 2 / seconds, "tokens_per_window": lengths}
        log(f"package, one window at a time: {2 / seconds:.2f} windows/s")

        seconds, package16 = synchronized(lambda: BatchDecodingTask(model, options).run(mels[:16]))
        results["package_step_loop_batch16"] = {"windows_per_s": 16 / seconds, "seconds": seconds}
        log(f"package step loop, batch 16: {16 / seconds:.2f} windows/s ({seconds:.1f} s, the first at this size)")

    largest = max(batches)
    mels = mels.repeat(-(-largest // len(mels)), 1, 1)[:largest]  # batches past 32 windows repeat them
    decoder = StaticDecoder(model, largest, dtype, use_graphs=True)
    seconds, _ = synchronized(decoder.capture)
    results["graph_capture_s"] = seconds
    results["fused_kernels"] = {"layer_norm": decoder.fused_norm, "query_key_value": bool(decoder._qkv)}
    static: dict[str, Any] = {}
    for batch in batches:
        run = lambda batch=batch: BatchDecodingTask(model, options, static_decoder=decoder).run(mels[:batch])  # noqa: E731
        first, _ = synchronized(run)
        seconds, decoded = synchronized(run)
        with torch.no_grad():
            encoder_s, _ = synchronized(lambda batch=batch: model.encoder(mels[:batch]))
        static[str(batch)] = {
            "windows_per_s": batch / seconds,
            "seconds": seconds,
            "first_call_s": first,
            "encoder_s": encoder_s,
            "step_ms": 1000 * (seconds - encoder_s) / max(len(decoded[0].tokens), 1),
            "graph_replay_ms": step_replay_ms(decoder, batch) if gpu else None,
            "tokens_per_window": float(np.mean([len(d.tokens) for d in decoded])),
        }
        if batch == 16:
            static16 = decoded
        log(f"static decoder, batch {batch}: {batch / seconds:.1f} windows/s ({static[str(batch)]})")
    results["static_decoder_cuda_graphs"] = static
    results["continuous_engine"] = continuous_engine(model, decoder, mels, options)
    engine_tokens = results["continuous_engine"].pop("tokens")
    # The engine's steps read the cache up to the longest row (services/whisper/decode_engine.py,
    # KEY_STEP); the same engine reading all of it, for the difference and the same tokens.
    results["continuous_engine_reading_all_keys"] = continuous_engine(model, decoder, mels, options, all_keys=True)
    all_keys_tokens = results["continuous_engine_reading_all_keys"].pop("tokens")
    shared = min(len(engine_tokens), 16)
    results["engine_against_engine_reading_all_keys"] = agreement(engine_tokens, all_keys_tokens)
    results["engine_against_static_batch16"] = agreement(engine_tokens[:shared], tokens(static16)[:shared])
    if package:
        results["engine_against_package_batch16"] = agreement(engine_tokens[:shared], tokens(package16)[:shared])
        results["static_against_package_batch16"] = agreement(tokens(static16), tokens(package16))
        results["package_alone_against_package_batch16"] = agreement(tokens(alone), tokens(package16[:2]))
        log(f"tokens, static against the package's loop: {results['static_against_package_batch16']}")
    log(f"tokens, engine against the static decoder: {results['engine_against_static_batch16']}")
    if gpu:
        results["step_kernels"] = step_kernels(decoder, largest)
        log(f"an eager step at batch {largest}, its kernels: {results['step_kernels']}")
    return results  # the model and the decoder's buffers are freed with this frame


def sequential_transcribe(checkpoint: Path, clips: list[np.ndarray]) -> dict[str, Any]:
    """openai-whisper's ``transcribe`` on one recording after another, as the service's options set it."""
    import torch
    import whisper

    gpu = device() == "cuda"

    def run(model: Any, recordings: list[np.ndarray]) -> dict[str, float]:
        seconds, outputs = synchronized(
            lambda: [
                whisper.transcribe(
                    model, clip, temperature=0.0, condition_on_previous_text=False, language="en", fp16=gpu
                )
                for clip in recordings
            ]
        )
        audio = sum(len(c) for c in recordings) / RATE
        windows = sum(len({s["seek"] for s in o["segments"]}) for o in outputs)
        tokens = sum(len(s["tokens"]) for o in outputs for s in o["segments"])
        return {
            "audio_s": audio,
            "wall_s": seconds,
            "audio_s_per_s": audio / seconds,
            "windows_with_segments": windows,
            "tokens_per_window": tokens / max(windows, 1),
        }

    shortest = sorted(clips, key=len)  # transcribe is slow: its share of the run's time is kept small
    model = whisper.load_model(str(checkpoint), device=device()).eval()
    whisper.transcribe(model, clips[0][: 5 * RATE], temperature=0.0, language="en")  # warm-up
    results = {"as_shipped_fp32_weights": run(model, shortest[:1])}
    log(f"transcribe as shipped: {results['as_shipped_fp32_weights']}")
    half_weights(model)
    results["fp16_weights"] = run(model, shortest[1:3])
    log(f"transcribe, fp16 weights: {results['fp16_weights']}")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


# The service


class Server(ServedProduct):
    def __init__(self, home: Path, port: int, **env: str) -> None:
        settings = {
            "BENTOML_HOME": str(home),
            "MULTIMODAL_PROFILE": "production",
            "MULTIMODAL_FAMILIES": "whisper",
            "MULTIMODAL_MAX_CONCURRENT_REQUESTS": "1024",
            "MULTIMODAL_WHISPER_MAX_QUEUED_WINDOWS": "1024",
        }
        super().__init__(port, home / f"serve-{port}.log", **{**settings, **env})

    def whisper_metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                decode = sample.name.startswith("whisper_batch") and sample.labels.get("kind") == "decode"
                if sample.name == "whisper_batch_size_sum" and sample.labels.get("kind") == "detect_language":
                    values["detected_windows"] = values.get("detected_windows", 0.0) + sample.value
                elif decode and sample.name.endswith(("_sum", "_count")):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
                elif decode and sample.name == "whisper_batch_size_bucket":  # batches of at most `le` windows
                    key = f"batches_up_to_{sample.labels['le']}"
                    values[key] = values.get(key, 0.0) + sample.value
                elif sample.name in (f"{STAGES}_sum", f"{STAGES}_count"):
                    key = f"stage_{sample.labels['stage']}{sample.name.removeprefix(STAGES)}"
                    values[key] = values.get(key, 0.0) + sample.value
        return values


class Timeline:
    """The service's counters every 0.2 s while a round runs, as rows of ``TIMELINE`` (seconds from
    the start, then cumulative counts): when uploads were decoded, languages detected, windows
    admitted to the decoder and answers given, so the seconds before the GPU is full have names.
    Each sample is a scrape of the entry service's ``/metrics``: the round's figures include that load."""

    TIMELINE = ("t_s", "audio_decoded", "languages_detected", "windows_detected", "windows_admitted", "transcribed")

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Timeline:
        self.rows: list[list[float]] = []
        self._base = self.server.whisper_metrics()
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        keys = ("stage_decode_audio_count", "stage_detect_language_count", "detected_windows",
                "whisper_batch_size_sum", "stage_transcribe_count")  # fmt: skip
        while not self._stop.wait(0.2):
            try:
                values = self.server.whisper_metrics()
            except Exception as exc:  # a scrape that failed (the server busy past its timeout): a gap
                log(f"timeline: a scrape failed ({exc!r})")
                continue
            t = round(time.perf_counter() - self._started, 2)
            self.rows.append([t, *(values.get(k, 0.0) - self._base.get(k, 0.0) for k in keys)])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def transcribe_all(
    url: str, bodies: list[bytes], concurrency: int, language: str | None = None
) -> dict[str, Any]:
    """Every recording once, ``concurrency`` requests in flight; latencies, statuses, tokens per segment.
    ``language``: sent with each request (else the service detects it, one model call more a recording)."""
    import httpx

    latencies: list[float] = []
    finished: list[float] = []  # seconds after the round's start: when the GPU's work reached each caller
    statuses: dict[int, int] = {}
    tokens: list[int] = []
    queue = list(enumerate(bodies))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            _, body = queue.pop(0)
            started = time.perf_counter()
            response = await http.post(
                f"{url}/v1/audio/transcriptions",
                files={"file": ("speech.wav", body, "audio/wav")},
                data={
                    "model": "whisper-1",
                    "temperature": "0",
                    "response_format": "verbose_json",
                    **({"language": language} if language else {}),
                },
            )
            latencies.append(time.perf_counter() - started)
            finished.append(time.perf_counter() - round_started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                tokens.extend(len(s["tokens"]) for s in response.json()["segments"])

    round_started = time.perf_counter()
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - round_started
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "wall_s": wall,
        "statuses": statuses,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "segment_tokens": int(np.sum(tokens)),
        "finished_s": sorted(round(t, 2) for t in finished),
    }


def served(
    home: Path,
    clips: list[np.ndarray],
    port: int,
    env: dict[str, str],
    rounds: list[tuple[str, int, int, str | None]],
    profile: Path | None = None,
) -> dict[str, Any]:
    """Each round through ``bentoml serve`` with ``env``; ``profile``: py-spy the entry service's first
    worker and the Whisper service during the round "32 concurrent", into files named from it."""
    bodies = [wav_bytes(c) for c in clips]
    server = Server(home, port, **env)
    started = time.perf_counter()
    try:
        server.wait_ready(900)
        results: dict[str, Any] = {"ready_s": time.perf_counter() - started, "env": env}
        log(f"served ({env}) in {results['ready_s']:.0f} s")
        asyncio.run(transcribe_all(server.url, bodies[:1], 1))  # one request through every part
        for name, concurrency, count, language in rounds:
            before = server.whisper_metrics()
            if profile is not None and name == "32 concurrent":
                for service in ("Gateway", "Whisper"):
                    workers = server.workers(service)
                    if workers:  # 0.5 s in, for 4 s: the round lasts 5 to 7 s
                        out = profile.with_name(f"pyspy-{profile.name}-{service.lower()}.txt")
                        threading.Timer(0.5, py_spy, (workers[0].pid, out, 4)).start()
            with GpuSampler() as gpu, Timeline(server) as timeline:
                level = asyncio.run(transcribe_all(server.url, bodies[:count], concurrency, language))
            after = server.whisper_metrics()
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            audio = sum(len(c) for c in clips[:count]) / RATE
            windows = delta.get("whisper_batch_size_sum", 0.0)
            level.update(
                audio_s=audio,
                audio_s_per_s=audio / level["wall_s"],
                gpu_busy_percent=gpu.mean,
                gpu_busy_every_200ms=gpu.samples,
                timeline={"columns": Timeline.TIMELINE, "rows": timeline.rows},
                windows=windows,
                mean_decode_batch=windows / max(delta.get("whisper_batch_size_count", 0.0), 1),
                decode_busy_s=delta.get("whisper_batch_duration_seconds_sum", 0.0),
                tokens_per_window=level["segment_tokens"] / max(windows, 1),
                batch_sizes={k.removeprefix("batches_up_to_"): v for k, v in delta.items() if k.startswith("batches")},
                # per request, the mean seconds in each stage of the entry service (services/whisper/api.py)
                stage_mean_s={
                    k.removeprefix("stage_").removesuffix("_sum"): round(v / max(delta[k[:-4] + "_count"], 1), 3)
                    for k, v in delta.items()
                    if k.startswith("stage_") and k.endswith("_sum")
                },
            )
            results[name] = level
            log(f"{name}: {json.dumps(level)}")
    finally:
        server.stop()
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {
        "transcribe\n(as shipped)": results["transcribe"]["as_shipped_fp32_weights"]["audio_s_per_s"],
        "transcribe\n(fp16 weights)": results["transcribe"]["fp16_weights"]["audio_s_per_s"],
    }
    for name, served_results in results["served"].items():
        for level in ("1 at a time", "8 concurrent", "32 concurrent", "32 concurrent, language given"):
            if level in served_results:
                label = name.replace(", ", "\n")
                bars[f"service, {label}\n{level}"] = served_results[level]["audio_s_per_s"]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(bars)), 4.5))
    ax.bar(list(bars), list(bars.values()), color="tab:blue")
    ax.set_ylabel("audio seconds per wall second")
    ax.set_title(f"Whisper large-v3 shape, random weights, 224 tokens/window ({results['gpu']})")
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    plt.xticks(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_timeline(results: dict[str, Any], path: Path, rounds: list[str]) -> None:
    """Each round's seconds: windows detected and admitted to the decoder, answers given (the
    service's counters, ``Timeline``) and the GPU's busy share, one panel a round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [(config, name, level) for config, levels in results.get("served", {}).items()
              for name, level in levels.items()
              if name in rounds and isinstance(level, dict) and level.get("timeline", {}).get("rows")]  # fmt: skip
    if not served:  # no round with a timeline (an older run's JSON, or no decoder served)
        log(f"no timeline to plot in rounds {rounds}")
        return
    fig, axes = plt.subplots(len(served), 1, figsize=(8, 2.6 * len(served)), squeeze=False, sharex=True)
    for ax, (config, name, level) in zip(axes[:, 0], served, strict=True):
        columns = level["timeline"]["columns"]
        rows = np.array(level["timeline"]["rows"])
        t = rows[:, 0]
        for column, color in (("windows_detected", "tab:orange"), ("windows_admitted", "tab:blue")):
            ax.step(t, rows[:, columns.index(column)], where="post", color=color, label=column.replace("_", " "))
        answers = rows[:, columns.index("transcribed")]
        ax.step(t, answers * rows[:, columns.index("windows_admitted")].max() / max(level["requests"], 1),
                where="post", color="tab:green", label=f"answers (of {level['requests']}, scaled)")  # fmt: skip
        busy = level["gpu_busy_every_200ms"]
        gpu = ax.twinx()
        gpu.fill_between(0.2 * np.arange(1, len(busy) + 1), busy, step="pre", alpha=0.15, color="gray")
        gpu.set_ylim(0, 105)
        gpu.set_ylabel("GPU busy %")
        ax.set_ylabel("windows")
        ax.set_title(f"{name}: {level['audio_s_per_s']:.0f} audio s/s ({config})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds from the round's start")
    fig.suptitle(f"Whisper large-v3 shape, 32 recordings of 30-120 s ({results['gpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> None:
    import soundfile
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool, rate = soundfile.read(Path(args.speech) / POOL, dtype="float32")
    assert rate == RATE, rate
    durations = list(np.linspace(30, 120, 32))
    np.random.default_rng(0).shuffle(durations)
    clips = recordings(pool, durations)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if device() == "cuda" else "CPU",
        "recordings_s": [round(d, 1) for d in durations],
    }
    home = Path(tempfile.mkdtemp(prefix="bench-whisper-"))
    checkpoint = write_model(home, args.shape)
    if "attention" in args.steps and device() == "cuda":
        results["cross_attention_ms"] = cross_attention_backends()
    if "decode" in args.steps or "engine" in args.steps:
        results["decode"] = decode_path(checkpoint, clips, args.decode_batches, package="decode" in args.steps)
        gc.collect()
        torch.cuda.empty_cache()
    (out / "whisper_gpu.json").write_text(json.dumps(results, indent=1))  # after each step: a cut-off run keeps some
    if "transcribe" in args.steps:
        results["transcribe"] = sequential_transcribe(checkpoint, clips)
        (out / "whisper_gpu.json").write_text(json.dumps(results, indent=1))
    results["served"] = {}
    rounds: list[tuple[str, int, int, str | None]] = [
        ("warm-up 32 concurrent", 32, 32, None),
        ("32 concurrent", 32, 32, None),
        # as transcribe is run above: told the language, so both do the same work
        ("32 concurrent, language given", 32, 32, "en"),
        ("8 concurrent", 8, 16, None),
        ("1 at a time", 1, 4, None),
    ]
    for decoder in args.decoders:
        env = {
            "MULTIMODAL_WHISPER_DECODER": decoder,
            "MULTIMODAL_WHISPER_MAX_BATCH_SIZE": str(args.batch),
            "MULTIMODAL_GATEWAY_WORKERS": str(args.gateway_workers),
        }
        chosen = {
            "continuous": rounds,
            "static": rounds[:3],
            "reference": [("32 concurrent", 32, args.reference_requests, None)],
        }[decoder]
        profile = out / f"{decoder}-batch{args.batch}" if args.profile else None
        results["served"][f"{decoder}, batch {args.batch}"] = served(home, clips, 3100, env, chosen, profile)
        (out / "whisper_gpu.json").write_text(json.dumps(results, indent=1))
    for variant in args.variants:  # the first decoder again, with settings of its own over it
        extra = dict(setting.split("=", 1) for setting in variant.split(","))
        env = {
            "MULTIMODAL_WHISPER_DECODER": args.decoders[0],
            "MULTIMODAL_WHISPER_MAX_BATCH_SIZE": str(args.batch),
            "MULTIMODAL_GATEWAY_WORKERS": str(args.gateway_workers),
        }
        name = ", ".join(f"{k.removeprefix('MULTIMODAL_').lower()} {v}" for k, v in extra.items())
        profile = out / name.replace(" ", "").replace(",", "-") if args.profile else None
        measured = served(home, clips, 3100, {**env, **extra}, rounds[:3], profile)
        results["served"][f"{args.decoders[0]}, {name}"] = measured
        (out / "whisper_gpu.json").write_text(json.dumps(results, indent=1))
    (out / "whisper_gpu.json").write_text(json.dumps(results, indent=1))
    if "transcribe" in results:
        plot(results, out / "whisper_gpu.png")
    plot_timeline(results, out / "whisper_timeline.png", ["32 concurrent", "32 concurrent, language given"])
    log(f"results in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    speech = commands.add_parser("speech", help="write the speech pool (needs espeak-ng and ffmpeg)")
    speech.add_argument("--out", default=".speech")
    speech.add_argument("--minutes", type=float, default=10)
    measure = commands.add_parser("run", help="the whole measurement (needs a GPU)")
    measure.add_argument("--speech", default=".speech")
    measure.add_argument("--shape", choices=list(SHAPES), default="large-v3", help="small: a smoke run on a CPU")
    measure.add_argument("--out", default="bench/results")
    measure.add_argument(
        "--steps",
        nargs="*",
        default=["decode", "transcribe"],
        choices=["attention", "decode", "engine", "transcribe"],
        help="engine: the decode path without openai-whisper's own loops (a minute less); "
        "attention: a step's cross-attention by each of torch's ways to compute it",
    )
    measure.add_argument(
        "--decoders", nargs="*", default=["continuous", "static"], choices=["continuous", "static", "reference"]
    )
    measure.add_argument("--batch", type=int, default=128, help="the service's MULTIMODAL_WHISPER_MAX_BATCH_SIZE")
    measure.add_argument("--gateway-workers", type=int, default=4, help="the service's MULTIMODAL_GATEWAY_WORKERS")
    measure.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 16, 32, 64])
    measure.add_argument("--reference-requests", type=int, default=8, help="recordings sent to the reference decoder")
    measure.add_argument(
        "--variants", nargs="*", default=[], metavar="K=V[,K=V]",
        help="settings served beside the first decoder's, each a warm-up and a round of 32 concurrent; "
        "for example MULTIMODAL_WHISPER_MAX_BATCH_SIZE=128",
    )  # fmt: skip
    measure.add_argument("--profile", action="store_true", help="py-spy both services in each round of 32 concurrent")
    timeline = commands.add_parser("timeline", help="plot the rounds' timelines of a run's JSON")
    timeline.add_argument("json", type=Path)
    timeline.add_argument("--out", type=Path, required=True)
    timeline.add_argument("--rounds", nargs="+", default=["32 concurrent", "32 concurrent, language given"])
    args = parser.parse_args()
    if args.command == "speech":
        write_speech(Path(args.out), args.minutes)
    elif args.command == "timeline":
        plot_timeline(json.loads(args.json.read_text()), args.out, args.rounds)
    else:
        run(args)


if __name__ == "__main__":
    main()
