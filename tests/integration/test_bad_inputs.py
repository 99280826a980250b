"""A hand-written corpus of bad input on every route, against a real ``bentoml serve`` of the whole product.

Each case names the status and error code the API documents for it; every answer must be that,
in the one error shape (``services.common.errors``), and the product must stay healthy after each one.
These are the inputs schemathesis does not make (test_fuzz.py): lone surrogates sent as JSON
escapes, NaN and infinite float audio, pixel bombs, malformed data URLs, bodies over the caps.
The server's caps are ``tests.conftest.HARDENED_LIMITS``, so that each is reached with a small body.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    b64,
    image_chat,
    metric_value,
    palette_png,
    png_bytes,
    png_header_only,
    random_image,
    wav_bytes,
)

pytestmark = pytest.mark.integration
TIMEOUT = 120


@dataclass(frozen=True)
class Case:
    route: str
    status: int
    code: str | None  # None where the API documents only the status (a framework's own check)
    json: Any = None  # sent with json.dumps: non-ASCII as \\u escapes, so lone surrogates travel as such
    raw: bytes | None = None  # sent as it is
    content_type: str = "application/json"
    files: dict[str, bytes] | None = None  # multipart upload
    form: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str | None = None  # the URL, where ``route`` (the document's path) has parameters


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _palette_bomb(width: int, height: int) -> bytes:
    """A palette PNG of one colour: a few KB on the wire, width x height x 3 bytes once decoded to RGB."""
    row = b"\x00" + bytes(width)  # filter byte, then one palette index per pixel
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", b"\xff\x00\x00")
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def _float_wav(value: float) -> bytes:
    samples = np.full(16_000, 0.1, dtype=np.float32)
    samples[4_000:4_100] = value
    return wav_bytes(samples, subtype="FLOAT")


PNG = png_bytes(random_image(31, (40, 30)))
IMAGE = b64(PNG)
URL = f"data:image/png;base64,{IMAGE}"
JPEG_HEAD = _encoded(random_image(32, (64, 48)), "JPEG")[:200]
TIFF = _encoded(random_image(33, (8, 8)), "TIFF")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
OVER_IMAGE_CAP = b64(PNG + bytes(2**20))  # a valid PNG header, then more bytes than MAX_IMAGE_BYTES (1 MiB)
BOMB_400MP = _palette_bomb(20_000, 20_000)
BOMB_40MP = _palette_bomb(6324, 6324)  # 39,992,976 pixels: just under MAX_IMAGE_PIXELS, ~1,000 pixels per byte
# Under every per-image check (~150 pixels per byte), over the 100 MP request budget together.
BUDGET_IMAGES = [f"data:image/png;base64,{b64(palette_png(5000, 5000, 80, seed))}" for seed in range(5)]  # 125 MP
BUDGET_CHAT = [
    {
        "role": "user",
        "content": [
            {
                "type": "image_url",
                "image_url": {"url": f"data:image/png;base64,{b64(palette_png(5200, 5200, 90, seed))}"},
            }
            for seed in range(4)
        ],
    }
]  # 108 MP
WAV = wav_bytes(np.random.default_rng(34).uniform(-0.1, 0.1, 16_000).astype(np.float32))
SILENT_WAV = wav_bytes(np.zeros(0, dtype=np.float32))
LONG_WAV = wav_bytes(np.zeros(8_000 * 61, dtype=np.float32), 8_000, "PCM_U8")  # 61 s: over MAX_AUDIO_SECONDS
CORRUPT_MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8
OVER_BODY_CAP = b'{"image_data": "' + b"A" * (5 * 2**20) + b'", "texts": ["a"]}'  # 5 MiB: over MAX_REQUEST_BYTES
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
SEARCH = {"image_data": IMAGE, "texts": ["a cat"]}
CLASSIFY = {"image_data": IMAGE, "labels": ["cat", "dog"]}
EMBED = {"model": "tiny-clip"}
CHAT = {"model": "tiny-llava", "max_tokens": 4}
TEXT_CHAT = [{"role": "user", "content": "hi"}]
CONTEXT = 512  # MULTIMODAL_LLAVA_MAX_MODEL_LEN of the server under test


def search(**fields: Any) -> dict:
    return {**SEARCH, **fields}


def classify(**fields: Any) -> dict:
    return {**CLASSIFY, **fields}


def embed(value: Any = None, **fields: Any) -> dict:
    return {**EMBED, "input": value, **fields}


def chat(messages: Any = TEXT_CHAT, **fields: Any) -> dict:
    return {**CHAT, "messages": messages, **fields}


def audio(route: str, data: bytes, status: int, code: str | None, **form: str) -> Case:
    defaults = {} if route == "/transcribe" else {"model": "whisper-1"}
    field_name = "audio" if route == "/transcribe" else "file"
    return Case(route, status, code, files={field_name: data}, form={**defaults, **form})


LIB = "/v1/library"


def library(
    tail: str, status: int, code: str | None, *, collection: str = "c", query: str = "", **request: Any
) -> Case:
    """A case on ``/v1/library/{collection}<tail>``, sent to the collection ``collection``."""
    return Case(f"{LIB}/{{collection}}{tail}", status, code, path=f"{LIB}/{collection}{tail}{query}", **request)


def library_add(**item: Any) -> dict:
    return {"images": [{"image": IMAGE, **item}]}


CASES: dict[str, Case] = {
    # /search: body, types, empty values, images
    "search malformed json": Case("/search", 400, "invalid_json", raw=b"{not json"),
    "search empty body": Case("/search", 400, "invalid_value", raw=b""),
    "search body is a list": Case("/search", 400, "invalid_value", json=[]),
    "search body is null": Case("/search", 400, "invalid_value", json=None, raw=b"null"),
    "search NaN literal": Case("/search", 400, "invalid_value", raw=b'{"image_data": NaN, "texts": ["a"]}'),
    "search 100000-deep nesting": Case("/search", 400, None, raw=DEEP_JSON),
    "search text/plain body": Case(
        "/search", 400, "invalid_value", raw=json.dumps(SEARCH).encode(), content_type="text/plain"
    ),
    "search missing image": Case("/search", 400, "invalid_value", json={"texts": ["a"]}),
    "search image is a number": Case("/search", 400, "invalid_value", json=search(image_data=5)),
    "search texts is a string": Case("/search", 400, "invalid_value", json=search(texts="a cat")),
    "search texts are numbers": Case("/search", 400, "invalid_value", json=search(texts=[1, 2])),
    "search return_embeddings a list": Case("/search", 400, "invalid_value", json=search(return_embeddings=[1])),
    "search unknown field": Case("/search", 400, "invalid_value", json=search(extra=1)),
    "search empty image": Case("/search", 400, "invalid_value", json=search(image_data="")),
    "search no texts": Case("/search", 400, "invalid_value", json=search(texts=[])),
    "search blank text": Case("/search", 400, "invalid_value", json=search(texts=["a", " \t"])),
    "search 257 texts": Case("/search", 400, "too_many_inputs", json=search(texts=["a"] * 257)),
    "search 4097-character text": Case("/search", 400, "text_too_long", json=search(texts=["a" * 4097])),
    "search lone high surrogate": Case("/search", 400, "invalid_value", json=search(texts=["cat \ud800"])),
    "search lone low surrogate": Case("/search", 400, "invalid_value", json=search(texts=["\udfff"])),
    "search invalid base64": Case("/search", 400, "invalid_base64", json=search(image_data="not*base64!")),
    "search base64 of text": Case(
        "/search", 400, "invalid_image", json=search(image_data=b64(b"I am not an image" * 8))
    ),
    "search truncated jpeg": Case("/search", 400, "invalid_image", json=search(image_data=b64(JPEG_HEAD))),
    "search tiff": Case("/search", 400, "invalid_image", json=search(image_data=b64(TIFF))),
    "search svg": Case("/search", 400, "invalid_image", json=search(image_data=b64(SVG))),
    "search data url not base64": Case("/search", 400, "invalid_image", json=search(image_data="data:image/png,abc")),
    "search data url without payload": Case(
        "/search", 400, "invalid_image", json=search(image_data="data:image/png;base64,")
    ),
    "search data url of text": Case(
        "/search", 400, "invalid_image", json=search(image_data="data:text/plain;base64,aGVsbG8=")
    ),
    "search image over the byte cap": Case("/search", 413, "image_too_large", json=search(image_data=OVER_IMAGE_CAP)),
    "search header claims 20000x20000": Case(
        "/search", 413, "image_too_large", json=search(image_data=b64(png_header_only(20_000, 20_000)))
    ),
    "search palette bomb 20000x20000": Case("/search", 413, "image_too_large", json=search(image_data=b64(BOMB_400MP))),
    "search palette bomb 6324x6324": Case("/search", 413, "image_too_large", json=search(image_data=b64(BOMB_40MP))),
    "search body over the cap": Case("/search", 413, "request_too_large", raw=OVER_BODY_CAP),
    "search GET": Case("/search", 405, "method_not_allowed", method="GET"),
    # /classify
    "classify template without slot": Case("/classify", 400, "invalid_value", json=classify(template="a photo")),
    "classify template is a number": Case("/classify", 400, "invalid_value", json=classify(template=7)),
    "classify no labels": Case("/classify", 400, "invalid_value", json=classify(labels=[])),
    "classify blank label": Case("/classify", 400, "invalid_value", json=classify(labels=[""])),
    "classify labels is null": Case("/classify", 400, "invalid_value", json=classify(labels=None)),
    "classify 257 labels": Case("/classify", 400, "too_many_inputs", json=classify(labels=["a"] * 257)),
    "classify lone surrogate label": Case("/classify", 400, "invalid_value", json=classify(labels=["cat\ud83d"])),
    "classify lone surrogate template": Case("/classify", 400, "invalid_value", json=classify(template="\ud800 {}")),
    "classify header claims 9000x9000": Case(
        "/classify", 413, "image_too_large", json=classify(image_data=b64(png_header_only(9_000, 9_000)))
    ),
    "classify base64 with a hole": Case(
        "/classify", 400, "invalid_base64", json=classify(image_data=IMAGE[:8] + "=" + IMAGE[8:])
    ),
    "classify palette bomb 6324x6324": Case(
        "/classify", 413, "image_too_large", json=classify(image_data=b64(BOMB_40MP))
    ),
    "classify malformed json": Case("/classify", 400, "invalid_json", raw=b'{"image_data": "x", "labels": ["a"'),
    # /v1/embeddings
    "embeddings unknown model": Case(
        "/v1/embeddings", 404, "model_not_found", json={"model": "text-embedding-3-small", "input": "a"}
    ),
    "embeddings empty model": Case("/v1/embeddings", 400, "invalid_value", json={"model": "", "input": "a"}),
    "embeddings missing model": Case("/v1/embeddings", 400, "invalid_value", json={"input": "a"}),
    "embeddings missing input": Case("/v1/embeddings", 400, "invalid_value", json=EMBED),
    "embeddings empty list": Case("/v1/embeddings", 400, "invalid_value", json=embed([])),
    "embeddings empty string": Case("/v1/embeddings", 400, "invalid_value", json=embed("")),
    "embeddings token ids": Case("/v1/embeddings", 400, "invalid_value", json=embed([[1, 2, 3]])),
    "embeddings number": Case("/v1/embeddings", 400, "invalid_value", json=embed(42)),
    "embeddings null input": Case("/v1/embeddings", 400, "invalid_value", json=embed(None)),
    "embeddings encoding int8": Case("/v1/embeddings", 400, "invalid_value", json=embed("a", encoding_format="int8")),
    "embeddings wrong dimensions": Case("/v1/embeddings", 400, "invalid_value", json=embed("a", dimensions=7)),
    "embeddings dimensions a string": Case("/v1/embeddings", 400, "invalid_value", json=embed("a", dimensions="many")),
    "embeddings lone surrogate": Case("/v1/embeddings", 400, "invalid_value", json=embed(["fine", "bad \ud800"])),
    "embeddings lone surrogate in a key": Case(
        "/v1/embeddings", 400, "invalid_value", json={**embed("a"), "\udc00": 1}
    ),
    "embeddings 257 inputs": Case("/v1/embeddings", 400, "too_many_inputs", json=embed(["a"] * 257)),
    "embeddings 4097 characters": Case("/v1/embeddings", 400, "text_too_long", json=embed("b" * 4097)),
    "embeddings image not base64": Case(
        "/v1/embeddings", 400, "invalid_base64", json=embed(["data:image/png;base64,@@@@"])
    ),
    "embeddings image undecodable": Case(
        "/v1/embeddings", 400, "invalid_image", json=embed(["data:image/png;base64,AAAA"])
    ),
    "embeddings image tiff": Case(
        "/v1/embeddings", 400, "invalid_image", json=embed([f"data:image/tiff;base64,{b64(TIFF)}"])
    ),
    "embeddings image pixel bomb": Case(
        "/v1/embeddings", 413, "image_too_large", json=embed([f"data:image/png;base64,{b64(BOMB_400MP)}"])
    ),
    "embeddings palette bomb 6324x6324": Case(
        "/v1/embeddings", 413, "image_too_large", json=embed(["a cat", f"data:image/png;base64,{b64(BOMB_40MP)}"])
    ),
    "embeddings images over the request's pixel budget": Case(
        "/v1/embeddings", 413, "too_many_pixels", json=embed(BUDGET_IMAGES)
    ),
    "embeddings malformed json": Case(
        "/v1/embeddings", 400, "invalid_json", raw=b'{"model": "tiny-clip", "input": "a",}'
    ),
    # /v1/chat/completions (checked by the gateway; only the context length reaches vLLM)
    "chat unknown model": Case("/v1/chat/completions", 404, "model_not_found", json={**chat(), "model": "gpt-4o"}),
    "chat missing messages": Case("/v1/chat/completions", 400, "invalid_value", json=CHAT),
    "chat no messages": Case("/v1/chat/completions", 400, "invalid_value", json=chat([])),
    "chat unknown role": Case(
        "/v1/chat/completions", 400, "invalid_value", json=chat([{"role": "robot", "content": "x"}])
    ),
    "chat content a number": Case(
        "/v1/chat/completions", 400, "invalid_value", json=chat([{"role": "user", "content": 5}])
    ),
    "chat audio part": Case(
        "/v1/chat/completions",
        400,
        "invalid_value",
        json=chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
    ),
    "chat file url": Case("/v1/chat/completions", 400, "invalid_image", json=chat(image_chat("file:///etc/passwd"))),
    "chat http url while fetching is off": Case(
        "/v1/chat/completions", 400, "image_url_disabled", json=chat(image_chat("http://169.254.169.254/latest"))
    ),
    "chat image not base64": Case(
        "/v1/chat/completions", 400, "invalid_base64", json=chat(image_chat("data:image/png;base64,@@"))
    ),
    "chat image undecodable": Case(
        "/v1/chat/completions", 400, "invalid_image", json=chat(image_chat("data:image/png;base64,AAAA"))
    ),
    "chat image svg": Case(
        "/v1/chat/completions", 400, "invalid_image", json=chat(image_chat(f"data:image/svg+xml;base64,{b64(SVG)}"))
    ),
    "chat image pixel bomb": Case(
        "/v1/chat/completions",
        413,
        "image_too_large",
        json=chat(image_chat(f"data:image/png;base64,{b64(BOMB_400MP)}")),
    ),
    "chat palette bomb 6324x6324": Case(
        "/v1/chat/completions", 413, "image_too_large", json=chat(image_chat(f"data:image/png;base64,{b64(BOMB_40MP)}"))
    ),
    "chat images over the request's pixel budget": Case(
        "/v1/chat/completions", 413, "too_many_pixels", json=chat(BUDGET_CHAT)
    ),
    "chat five images": Case("/v1/chat/completions", 400, "too_many_images", json=chat(image_chat(URL) * 5)),
    "chat max_tokens over the cap": Case("/v1/chat/completions", 400, "invalid_value", json=chat(max_tokens=17)),
    "chat max_tokens zero": Case("/v1/chat/completions", 400, "invalid_value", json=chat(max_tokens=0)),
    "chat temperature 3": Case("/v1/chat/completions", 400, "invalid_value", json=chat(temperature=3)),
    "chat top_p zero": Case("/v1/chat/completions", 400, "invalid_value", json=chat(top_p=0)),
    "chat n 9": Case("/v1/chat/completions", 400, "invalid_value", json=chat(n=9)),
    "chat stream a list": Case("/v1/chat/completions", 400, "invalid_value", json=chat(stream=[])),
    "chat lone surrogate in a part": Case(
        "/v1/chat/completions", 400, "invalid_value", json=chat(image_chat(URL, "what is \ud800?"))
    ),
    "chat lone surrogate content": Case(
        "/v1/chat/completions", 400, "invalid_value", json=chat([{"role": "user", "content": "\udfff"}])
    ),
    "chat prompt over the context": Case(
        "/v1/chat/completions",
        400,
        "context_length_exceeded",
        json=chat([{"role": "user", "content": "word " * 2 * CONTEXT}]),
    ),
    "chat malformed json": Case(
        "/v1/chat/completions", 400, "invalid_json", raw=b'{"model": "tiny-llava", "messages": [}'
    ),
    # Audio: OpenAI's transcriptions and translations, and the native /transcribe
    "transcriptions empty file": audio("/v1/audio/transcriptions", b"", 400, "empty_file"),
    "transcriptions png": audio("/v1/audio/transcriptions", PNG, 415, "unsupported_media_type"),
    "transcriptions text": audio("/v1/audio/transcriptions", b"not audio at all\n" * 30, 415, "unsupported_media_type"),
    "transcriptions NaN float wav": audio("/v1/audio/transcriptions", _float_wav(float("nan")), 400, "invalid_audio"),
    "transcriptions infinite wav verbose_json": audio(
        "/v1/audio/transcriptions", _float_wav(float("inf")), 400, "invalid_audio", response_format="verbose_json"
    ),
    "transcriptions truncated wav": audio("/v1/audio/transcriptions", WAV[: len(WAV) // 2], 400, "invalid_audio"),
    "transcriptions wav without samples": audio("/v1/audio/transcriptions", SILENT_WAV, 400, "empty_audio"),
    "transcriptions 61 s": audio("/v1/audio/transcriptions", LONG_WAV, 413, "audio_too_long"),
    "transcriptions over the byte cap": audio(
        "/v1/audio/transcriptions", b"RIFF" + bytes(2 * 2**20 + 1), 413, "file_too_large"
    ),
    "transcriptions corrupt mp3": audio("/v1/audio/transcriptions", CORRUPT_MP3, 400, "invalid_audio"),
    "transcriptions unknown model": audio("/v1/audio/transcriptions", WAV, 404, "model_not_found", model="whisper-9"),
    "transcriptions unknown language": audio(
        "/v1/audio/transcriptions", WAV, 400, "invalid_language", language="klingon"
    ),
    "transcriptions response_format xml": audio(
        "/v1/audio/transcriptions", WAV, 400, "invalid_value", response_format="xml"
    ),
    "transcriptions temperature 2": audio("/v1/audio/transcriptions", WAV, 400, "invalid_value", temperature="2"),
    "transcriptions temperature NaN": audio("/v1/audio/transcriptions", WAV, 400, "invalid_value", temperature="nan"),
    "transcriptions granularity char": audio(
        "/v1/audio/transcriptions", WAV, 400, "invalid_value", **{"timestamp_granularities[]": "char"}
    ),
    "transcriptions without model": Case("/v1/audio/transcriptions", 400, "invalid_value", files={"file": WAV}),
    "transcriptions file as text": Case(
        "/v1/audio/transcriptions", 400, "invalid_value", form={"model": "whisper-1", "file": "not a file"}
    ),
    "transcriptions json body": Case(
        "/v1/audio/transcriptions", 400, "invalid_value", json={"model": "whisper-1", "file": "x"}
    ),
    "translations empty file": audio("/v1/audio/translations", b"", 400, "empty_file"),
    "translations minus infinity wav": audio(
        "/v1/audio/translations", _float_wav(float("-inf")), 400, "invalid_audio", response_format="srt"
    ),
    "translations unknown model": audio("/v1/audio/translations", WAV, 404, "model_not_found", model="whisper-9"),
    "translations svg": audio("/v1/audio/translations", SVG, 415, "unsupported_media_type"),
    "transcribe NaN float wav": audio("/transcribe", _float_wav(float("nan")), 400, "invalid_audio"),
    "transcribe jpeg": audio("/transcribe", JPEG_HEAD, 415, "unsupported_media_type"),
    "transcribe no upload": Case("/transcribe", 400, "missing_file", form={"language": "en"}),
    "transcribe unknown language": audio("/transcribe", WAV, 400, "invalid_language", language="zz"),
    # The image library (collections are created by their first add: none exists here)
    "library POST the list": Case("/v1/library", 405, "method_not_allowed", json={}),
    "library unknown collection": library("", 404, "collection_not_found", collection="nope", method="GET"),
    "library collection name with a dash": library("", 400, "invalid_value", collection="bad-name", method="GET"),
    "library add no images": library("/images", 400, "invalid_value", json={"images": []}),
    "library add malformed json": library("/images", 400, "invalid_json", raw=b"{"),
    "library add invalid base64": library("/images", 400, "invalid_base64", json=library_add(image="not*base64!")),
    "library add truncated jpeg": library("/images", 400, "invalid_image", json=library_add(image=b64(JPEG_HEAD))),
    "library add palette bomb": library("/images", 413, "image_too_large", json=library_add(image=b64(BOMB_400MP))),
    "library add nested metadata": library("/images", 400, "invalid_value", json=library_add(metadata={"a": {"b": 1}})),
    "library add metadata key with a space": library(
        "/images", 400, "invalid_value", json=library_add(metadata={"a b": 1})
    ),
    "library add lone surrogate id": library("/images", 400, "invalid_value", json=library_add(id="x\ud800")),
    "library list limit over the cap": library("/images", 400, "invalid_value", method="GET", query="?limit=100000"),
    "library list limit zero": library("/images", 400, "invalid_value", method="GET", query="?limit=0"),
    "library delete one, unknown collection": Case(
        "/v1/library/{collection}/images/{item_id}",
        404,
        "collection_not_found",
        method="DELETE",
        path=f"{LIB}/nope/images/x",
    ),
    "library delete no ids": library("/delete", 400, "invalid_value", json={"ids": []}),
    "library delete ids a string": library("/delete", 400, "invalid_value", json={"ids": "x"}),
    "library lookup ids are numbers": library("/lookup", 400, "invalid_value", json={"ids": [1]}),
    "library search text and vector": library("/search", 400, "invalid_value", json={"text": "a", "vector": [0.1]}),
    "library search nothing to search by": library("/search", 400, "invalid_value", json={}),
    "library search top_k zero": library("/search", 400, "invalid_value", json={"text": "a", "top_k": 0}),
    "library search NaN vector": library("/search", 400, "invalid_value", raw=b'{"vector": [NaN, 1.0]}'),
    "library search unknown collection": library(
        "/search", 404, "collection_not_found", collection="nope", json={"text": "a cat"}
    ),
    # Every family
    "models POST": Case("/v1/models", 405, "method_not_allowed", json={}),
    "health POST": Case("/health", 405, "method_not_allowed", json={}),
    "unknown route": Case("/v2/embeddings", 404, "not_found", json=embed("a")),
}
# Defects this corpus found that are not fixed here: strict, so a fix shows as a passing xfail.
KNOWN_DEFECTS: dict[str, str] = {}


def send(server, case: Case) -> httpx.Response:
    url = f"{server.url}{case.path or case.route}"
    if case.method in ("GET", "DELETE"):
        return httpx.request(case.method, url, timeout=TIMEOUT)
    if case.files is not None or (case.form and case.json is None and case.raw is None):
        files = {name: ("upload.bin", data) for name, data in (case.files or {}).items()}
        return httpx.post(url, data=case.form, files=files or None, timeout=TIMEOUT)
    body = case.raw if case.raw is not None else json.dumps(case.json).encode()
    return httpx.post(url, content=body, headers={"content-type": case.content_type}, timeout=TIMEOUT)


def assert_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    expected_type = {404: "not_found_error"}.get(status, "invalid_request_error")
    assert error["type"] == expected_type, error
    assert error["param"] is None or isinstance(error["param"], str)
    if code is not None:
        assert error["code"] == code, error


def test_the_corpus_covers_every_route(hardened_product):
    document = httpx.get(f"{hardened_product.url}/openapi.json", timeout=30).json()
    routes = {case.route for case in CASES.values()}
    assert set(document["paths"]) - {"/ready"} <= routes, "a route without bad-input cases"
    assert len(CASES) >= 80


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[name]))
        if name in KNOWN_DEFECTS
        else name
        for name in CASES
    ],
)
def test_bad_input_is_its_documented_4xx(hardened_product, name: str) -> None:
    case = CASES[name]
    assert_error(send(hardened_product, case), case.status, case.code)
    assert httpx.get(f"{hardened_product.url}/health", timeout=10).status_code == 200


def test_a_tiny_whisper_temperature_is_greedy_not_a_500(hardened_product):
    # Found by test_fuzz.py: 2.2e-309 is 0.0 in float32, and the logits divided by it were all infinite.
    response = httpx.post(
        f"{hardened_product.url}/v1/audio/translations",
        data={"model": "whisper-1", "temperature": "2.2e-309", "response_format": "vtt"},
        files={"file": ("a.wav", WAV)},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert response.text.startswith("WEBVTT")


def test_the_product_still_works_after_the_corpus(hardened_product):
    url = hardened_product.url
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "healthy"
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
    search_answer = httpx.post(f"{url}/search", json=SEARCH, timeout=TIMEOUT)
    assert search_answer.status_code == 200 and len(search_answer.json()["similarities"]) == 1
    embeddings = httpx.post(f"{url}/v1/embeddings", json=embed(["a cat", URL]), timeout=TIMEOUT)
    assert embeddings.status_code == 200 and len(embeddings.json()["data"]) == 2
    chat_answer = httpx.post(f"{url}/v1/chat/completions", json=chat(image_chat(URL)), timeout=TIMEOUT)
    assert chat_answer.status_code == 200 and chat_answer.json()["choices"][0]["message"]["role"] == "assistant"
    speech = httpx.post(f"{url}/transcribe", files={"audio": ("a.wav", WAV)}, timeout=TIMEOUT)
    assert speech.status_code == 200 and set(speech.json()) == {"text", "language"}
    metrics = hardened_product.metrics()
    for family in ("clip", "llava", "whisper"):
        assert metric_value(metrics, f"{family}_requests_total", status="500") == 0, family
