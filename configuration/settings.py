"""Typed settings: every knob is an environment variable with the ``MULTIMODAL_`` prefix.

The original design's names (``MODEL_NAME``, ``BATCH_SIZE``, ``MAX_CONCURRENT_REQUESTS``,
``CACHE_TTL_SECONDS``) keep working as aliases; the prefixed name wins when both are set.
The README's settings table is generated from this class (``python -m configuration.settings``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from configuration.families import FAMILIES, Family

PREFIX = "MULTIMODAL_"


def _env(name: str, *legacy: str) -> AliasChoices:
    return AliasChoices(PREFIX + name, *legacy)


def _comma_separated(value: object) -> object:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


# A list given in the environment as "a,b,c".
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]
Families = Annotated[list[Family], NoDecode, BeforeValidator(_comma_separated)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", populate_by_name=True)

    # Models
    families: Families = Field(
        default_factory=lambda: list(FAMILIES),
        description="Model families this deployment serves, comma separated; the others' routes answer 404.",
    )
    profile: Literal["tiny", "production"] = Field(
        "tiny", description="Model profile: `tiny` (generated offline) or `production` (published weights)."
    )
    clip_model: str | None = Field(
        None,
        validation_alias=_env("CLIP_MODEL", "MODEL_NAME"),
        description="Hugging Face id of the production CLIP model; the profile's default when unset.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where models run; `auto` picks CUDA when present."
    )

    # Batching (CLIP: continuous batching in its service; Whisper: BentoML's adaptive batching)
    clip_max_batch_size: int = Field(
        64,
        ge=1,
        validation_alias=_env("CLIP_MAX_BATCH_SIZE", "BATCH_SIZE"),
        description="Largest CLIP image batch; 1 turns image batching off.",
    )
    clip_max_text_batch_size: int = Field(
        256,
        ge=1,
        description="Largest CLIP text batch; 1 turns text batching off. Larger than images' because a text "
        "costs the GPU a small fraction of an image (ViT-L/14 on an H200: 14,100 texts/s at batch 64, 35,300 at 256).",
    )
    clip_max_latency_ms: int = Field(
        10_000,
        ge=10,
        description="Longest a CLIP input may wait for its batch; past it the CLIP service sheds load with 503.",
    )
    clip_preprocessing: Literal["fast", "reference"] = Field(
        "fast",
        description="`fast`: JPEGs decoded and every image resized on the model's device (nvJPEG on a GPU); "
        "`reference`: Pillow and transformers' processor on the CPU.",
    )
    clip_workers: int = Field(
        1,
        ge=1,
        description=(
            "CLIP service processes (each with the model) sharing the device. One per GPU is fastest on an "
            "H200: a worker already overlaps its preparation with its model, and two time-slice the GPU "
            "(bench/RESULTS.md, run 15)."
        ),
    )
    clip_decode_threads: int = Field(4, ge=1, description="Threads of the CLIP service that decode images with Pillow.")
    clip_calls_in_flight: int = Field(
        1,
        ge=1,
        description="CLIP calls each entry-service worker keeps in flight per kind (images, texts); "
        "requests arriving meanwhile are merged into the next call. 1 served the most single texts and as many "
        "images as 2 on an H200 (bench/RESULTS.md, runs 16, 18 and 19).",
    )
    clip_cuda_graphs: bool = Field(
        True,
        description="On a GPU, run CLIP's encoders as CUDA graphs captured per batch size at start-up "
        "(one launch per batch instead of hundreds).",
    )
    clip_cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Threads of torch's CPU pool in each CLIP worker; unset: 1 on a GPU (the model runs there, "
        "and small CPU ops woke a pool of one spinning thread per core), torch's default on a CPU.",
    )
    whisper_max_batch_size: int = Field(
        16,
        ge=1,
        description="Most 30-second windows in one Whisper decode batch. On a GPU each holds 304 MiB of decoder "
        "cache at large-v3 (128 windows: 38 GiB); 128 served 32 concurrent recordings fastest on an H200.",
    )
    whisper_max_latency_ms: int = Field(
        60_000, ge=10, description="Latency budget of a Whisper batch; past it BentoML sheds load with 503."
    )
    whisper_max_queued_windows: int = Field(
        128,
        ge=1,
        description="Most 30-second windows (one per chunk of a recording) admitted at once per entry-service "
        "worker, waiting or decoding; past it a transcription gets 429. Requests take turns, one window each.",
    )
    whisper_long_audio: Literal["parallel", "sequential"] = Field(
        "parallel",
        description="Recordings over 30 s: `parallel` cuts them at pauses and decodes the chunks at once; "
        "`sequential` runs openai-whisper's `transcribe` over the whole file (its text exactly, one window at "
        "a time). A request's `long_audio` form field overrides it.",
    )
    whisper_decoder: Literal["auto", "continuous", "static", "reference"] = Field(
        "auto",
        description="`continuous`: windows join and leave the running batch at every step "
        "(services/whisper/decode_engine.py); `static`: batches decoded whole; both over a fixed-size KV cache, "
        "each step one CUDA graph on a GPU, with openai-whisper's tokens; `reference`: openai-whisper's own step "
        "loop; `auto`: `continuous` on a GPU, `reference` on a CPU (where the package's loop is fastest).",
    )
    whisper_temperature_fallback: bool = Field(
        False,
        description="At temperature 0, retry a window at rising temperatures when its text looks failed "
        "(openai-whisper's default); off keeps answers deterministic.",
    )

    # Traffic
    gateway_workers: int = Field(
        1, ge=1, description="Entry-service worker processes; more spread HTTP, JSON and base64 work over cores."
    )
    own_listening_sockets: bool = Field(
        True,
        description="Each worker of a service listens on a socket of its own (SO_REUSEPORT, Linux), so that "
        "connections spread evenly over workers; off: workers share one, as in BentoML, and take connections unevenly.",
    )
    freeze_start_up_objects: bool = Field(
        True,
        description="Each service exempts the objects it holds after start-up (libraries, model) from Python's "
        "garbage collector, whose full collections otherwise walk them all with the GIL held (100-300 ms pauses).",
    )
    max_concurrent_requests: int = Field(
        100,
        ge=1,
        validation_alias=_env("MAX_CONCURRENT_REQUESTS", "MAX_CONCURRENT_REQUESTS"),
        description="Requests in flight per entry-service worker; more get 429.",
    )
    request_timeout_seconds: float = Field(60.0, gt=0, description="Per-request timeout of every service.")
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description="Largest request body the entry service reads.")

    # Input limits
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="Largest encoded image.")
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest width x height of one image, checked from its header before decoding; "
        "40 MP takes every common full-resolution camera photo (24-36 MP).",
    )
    # A photograph compresses to at most ~40 pixels per byte (a flat JPEG ~70); a one-colour
    # palette PNG reaches ~1,000 and a 1-bit one ~8,000: only a bomb (or a blank canvas) is that small.
    max_image_pixels_per_byte: float = Field(
        200.0,
        gt=0,
        description="Most declared pixels per encoded byte for an image larger than "
        "`MULTIMODAL_IMAGE_RATIO_CHECK_MIN_PIXELS`: photographs stay under ~70, a decompression bomb "
        "(a 40 MP palette PNG of 12-39 KB: 1,000-3,000) is far over; past it, 413.",
    )
    image_ratio_check_min_pixels: int = Field(
        4_000_000,
        ge=0,
        description="Images of at most this many pixels skip the pixels-per-byte check: small flat images "
        "(logos, diagrams, solid test images) compress well and cost little.",
    )
    max_request_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Most pixels (sum of width x height) over every image of one request (embeddings, search, "
        "classify, chat), checked before decoding; past it, 413. Takes 4 full 24 MP photographs (a chat's "
        "default image count) or 256 images of 640x480; bulk embedding of larger photos should downscale first "
        "(CLIP sees 224x224).",
    )
    max_pixels_in_flight: int = Field(
        200_000_000,
        ge=1,
        description="Most decoded pixels one entry-service worker has sent on to CLIP or vLLM and not yet had "
        "answered (about 3 bytes each once decoded, several times that while resizing); a request that would "
        "pass it gets 429 with Retry-After. Two maximal requests, or ~100 of 2 MP.",
    )
    max_inputs_per_request: int = Field(256, ge=1, description="Most texts or images in one request.")
    max_text_chars: int = Field(
        4096, ge=1, description="Longest text input, in characters (CLIP truncates to 77 tokens)."
    )
    max_audio_bytes: int = Field(25 * 2**20, ge=1, description="Largest audio upload (OpenAI's 25 MB).")
    max_audio_seconds: float = Field(
        1800.0, gt=0, description="Longest audio accepted, in seconds; raise the request timeout with it."
    )
    ffmpeg_timeout_seconds: float = Field(
        30.0, gt=0, description="Wall-clock limit for decoding one upload with ffmpeg."
    )

    # Embedding cache
    cache_backend: Literal["memory", "redis", "none"] = Field(
        "memory", description="`memory` (in-process LRU), `redis` (needs a Redis URL) or `none`."
    )
    redis_url: str | None = Field(None, description="Redis URL; setting it selects the Redis cache.")
    cache_ttl_seconds: int = Field(
        3600,
        ge=1,
        validation_alias=_env("CACHE_TTL_SECONDS", "CACHE_TTL_SECONDS"),
        description="TTL of image embeddings.",
    )
    query_cache_ttl_seconds: int = Field(86_400, ge=1, description="TTL of text (query) embeddings.")
    cache_max_entries: int = Field(50_000, ge=1, description="Entries kept by the in-process cache.")
    redis_timeout_seconds: float = Field(
        0.25, gt=0, description="Socket timeout of Redis calls; a slow Redis is a miss."
    )
    redis_retry_after_seconds: float = Field(5.0, ge=0, description="After a Redis error, skip Redis this long.")

    # Image library (services/library): CLIP embeddings of your images, searched by text, image or vector
    library_store: Literal["embedded", "milvus"] = Field(
        "embedded",
        description="`embedded`: files on this host (one entry-service pod, or a shared volume); "
        "`milvus`: Milvus, in-process (milvus-lite) or a cluster (`MULTIMODAL_LIBRARY_MILVUS_URI`).",
    )
    library_path: Path | None = Field(
        None,
        description="Directory of the embedded store (and of milvus-lite's file); `$BENTOML_HOME/library` if unset.",
    )
    library_search_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the embedded store's exact search runs; `auto`: CUDA when there is a GPU."
    )
    library_milvus_uri: str | None = Field(
        None,
        description="Milvus to use: `http://host:19530` (a cluster), or a local `*.db` file path (milvus-lite, "
        "one entry-service worker only); `milvus.db` in the library directory if unset.",
    )
    library_milvus_token: str | None = Field(
        None, repr=False, description="Milvus credentials, `user:password` or an API key."
    )
    library_max_top_k: int = Field(1000, ge=1, le=16_384, description="Most results one library search may ask for.")
    library_max_page: int = Field(1000, ge=1, description="Most items one library listing page may ask for.")

    # LLaVA through vLLM (its OpenAI server runs inside the LLaVA service)
    llava_engine_port: int = Field(8000, description="Loopback port of the vLLM server inside the LLaVA service.")
    llava_max_model_len: int = Field(
        2048, ge=64, description="Context length in tokens: prompt (image tokens included) plus completion."
    )
    llava_max_num_seqs: int = Field(4, ge=1, description="Sequences vLLM batches at once (continuous batching).")
    llava_max_tokens: int = Field(
        512, ge=1, description="Largest `max_tokens` a chat request may ask for (also the default)."
    )
    llava_max_images_per_request: int = Field(4, ge=1, description="Most images in one chat request.")
    llava_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    llava_cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache size on a CPU machine (VLLM_CPU_KVCACHE_SPACE).")
    llava_dtype: str = Field("auto", description="vLLM `--dtype` (`auto`, `float32`, `bfloat16`, `float16`).")
    llava_engine_args: str = Field("", description="Extra vLLM server arguments, space separated.")

    # Remote images (http/https image URLs); off by default: see services/common/image_fetch.py
    image_fetch_enabled: bool = Field(False, description="Fetch http(s) image URLs at all.")
    image_fetch_allowed_hosts: CommaList = Field(
        default_factory=list, description="Host names that may be fetched, comma separated; empty: any public host."
    )
    image_fetch_trusted_networks: CommaList = Field(
        default_factory=list, description="Non-public networks (CIDR) that may still be fetched from, comma separated."
    )
    image_fetch_timeout_seconds: float = Field(10.0, gt=0, description="Total time for fetching one image.")
    image_fetch_max_redirects: int = Field(3, ge=0, description="Redirects followed, each hop checked again.")

    # Access (services/common/auth.py): no keys, no authentication
    api_keys: CommaList = Field(
        default_factory=list,
        repr=False,
        description="API keys, comma separated; when any is set (here or in the keys file), every route but "
        "`/livez`, `/readyz`, `/health`, `/ready` (and `/metrics`, see below) needs `Authorization: Bearer <key>`.",
    )
    api_keys_file: Path | None = Field(
        None,
        description=(
            "A file of API keys, one a line (`#` comments), e.g. a mounted Kubernetes Secret; "
            "adds to `MULTIMODAL_API_KEYS`."
        ),
    )
    metrics_open: bool = Field(
        True,
        description="Serve `/metrics` without an API key even when keys are set; `false`: a scrape needs a key too.",
    )

    @model_validator(mode="after")
    def _one_request_fits_in_flight(self) -> Settings:
        # Otherwise a request under the per-request budget could never be admitted: 429 forever.
        if self.max_request_pixels > self.max_pixels_in_flight:
            raise ValueError("MULTIMODAL_MAX_REQUEST_PIXELS must not exceed MULTIMODAL_MAX_PIXELS_IN_FLIGHT")
        return self

    def all_api_keys(self) -> list[str]:
        """``api_keys`` and the keys file's lines; a missing file fails the start rather than leave the API open."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys

    @property
    def effective_cache_backend(self) -> str:
        if self.cache_backend == "memory" and self.redis_url:
            return "redis"
        return self.cache_backend


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """Markdown table of every setting, its environment variables and default, for the README."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = list(alias.choices) if isinstance(alias, AliasChoices) else [PREFIX + name.upper()]
        names = list(dict.fromkeys(str(n) for n in names))
        value = field.get_default(call_default_factory=True)
        default = "unset" if value is None or value == [] else f"`{value}`"
        rows.append(f"| {' / '.join(f'`{n}`' for n in names)} | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
