"""LLaVA through real vLLM on the CPU, behind a real ``bentoml serve``, called with the ``openai`` SDK."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import bentoml
import httpx
import openai
import psutil
import pytest

from tests.conftest import REPO, free_port
from tests.helpers import b64, data_url, image_chat, metric_samples, png_bytes, png_header_only, random_image

pytestmark = pytest.mark.integration
MAX_MODEL_LEN = 512
TRUSTED_HOST = "127.0.0.2"  # a loopback address the server is told to trust, standing in for an image store
IMAGE = png_bytes(random_image(21, (40, 30)))


@pytest.fixture(scope="module")
def server(serve_product):
    """The whole product: every family, so the composition is what is tested."""
    return serve_product(
        MULTIMODAL_LLAVA_DTYPE="float32",  # exact parity with the reference engine
        MULTIMODAL_LLAVA_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
        MULTIMODAL_IMAGE_FETCH_ENABLED="true",
        MULTIMODAL_IMAGE_FETCH_TRUSTED_NETWORKS=f"{TRUSTED_HOST}/32",
    )


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, messages: list[dict], **options) -> str:
    response = client.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=12, temperature=0, **options
    )
    return response.choices[0].message.content


def offline_vllm_chat(messages: list[dict], max_tokens: int) -> dict:
    """vLLM's own ``LLM.chat`` on the same weights, in a process of its own."""
    request = {"messages": messages, "max_tokens": max_tokens, "dtype": "float32", "max_model_len": MAX_MODEL_LEN}
    model_dir = bentoml.models.get("tiny-llava").path
    command = [sys.executable, "-m", "tests.tools.vllm_offline_chat", model_dir, json.dumps(request)]
    # A session of its own, ended whole afterwards: vLLM's engine core outlives the script otherwise.
    run = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = run.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"offline vLLM failed:\n{stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


# The OpenAI API


def test_chat_with_an_image_equals_vllm_offline_chat(client):
    messages = image_chat(data_url(IMAGE))
    response = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=12, temperature=0)
    streamed = client.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    reference = offline_vllm_chat(messages, max_tokens=12)

    assert response.choices[0].message.content == reference["text"]
    assert streamed_text == reference["text"]
    assert response.usage.completion_tokens == len(reference["token_ids"])
    assert response.model == "tiny-llava"


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "tiny-llava", "messages": image_chat(data_url(IMAGE)), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}


def test_sampling_options_pass_through(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    response = client.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=8, temperature=0.8, top_p=0.9, seed=7, n=2, stop=["\n"]
    )
    again = client.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=8, temperature=0.8, top_p=0.9, seed=7, n=2, stop=["\n"]
    )
    assert len(response.choices) == 2
    assert [c.message.content for c in response.choices] == [c.message.content for c in again.choices]  # seeded
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)


def test_eight_concurrent_chats_all_succeed(client):
    images = [data_url(png_bytes(random_image(30 + i))) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda url: chat(client, image_chat(url)), images))
    assert len(answers) == 8 and all(isinstance(answer, str) for answer in answers)


def test_models_lists_every_served_family(server):
    ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert {"tiny-clip", "tiny-llava"} <= set(ids)


def test_vllm_metrics_appear_on_the_product_metrics(server, client):
    chat(client, image_chat(data_url(IMAGE)))
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_samples(text, "vllm:num_requests_running", model_name="tiny-llava")
    assert metric_samples(text, "llava_requests_total", endpoint="/v1/chat/completions", status="200")


# Limits and bad requests: 4xx in OpenAI's error shape


@pytest.mark.parametrize(
    "name,messages,options,error,code",
    [
        ("too many images", image_chat(data_url(IMAGE)) * 5, {}, openai.BadRequestError, "too_many_images"),
        (
            "over-large image",
            image_chat(data_url(png_header_only(20_000, 20_000))),
            {},
            openai.APIStatusError,
            "image_too_large",
        ),
        ("undecodable image", image_chat("data:image/png;base64,AAAA"), {}, openai.BadRequestError, "invalid_image"),
        (
            "prompt longer than the context",
            [{"role": "user", "content": "word " * 2 * MAX_MODEL_LEN}],
            {},
            openai.BadRequestError,
            "context_length_exceeded",
        ),
        (
            "max_tokens over the limit",
            [{"role": "user", "content": "hi"}],
            {"max_tokens": 100_000},
            openai.BadRequestError,
            "invalid_value",
        ),
        (
            "remote fetching of a file: URL",
            image_chat("file:///etc/passwd"),
            {},
            openai.BadRequestError,
            "invalid_image",
        ),
    ],
)
def test_bad_chat_requests_are_4xx_in_the_error_shape(client, name, messages, options, error, code):
    with pytest.raises(error) as raised:
        client.chat.completions.create(model="tiny-llava", messages=messages, **{"max_tokens": 4, **options})
    assert 400 <= raised.value.status_code < 500
    assert raised.value.body["code"] == code
    assert raised.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "messages", [image_chat(data_url(IMAGE), "what is \ud800?"), [{"role": "user", "content": "\udfff"}]]
)
def test_lone_surrogates_in_chat_are_400(server, messages):
    # Sent as JSON escapes ("\\ud800"), as json.dumps writes them; the SDK's encoder would refuse them.
    body = json.dumps({"model": "tiny-llava", "max_tokens": 4, "messages": messages}).encode()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert (
        response.json()["error"]["code"] == "invalid_value" and "lone surrogate" in response.json()["error"]["message"]
    )


def test_malformed_chat_bodies_are_400(server):
    for body in (
        {"model": "tiny-llava"},
        {"model": "tiny-llava", "messages": []},
        {"model": "tiny-llava", "messages": [{"role": "robot", "content": "x"}]},
    ):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


# Remote images: fetched by us, safely, or refused


class ImageServer(http.server.BaseHTTPRequestHandler):
    redirect_to: str = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)
        else:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def loopback_listener() -> Iterator[socket.socket]:
    """A listener on 127.0.0.1 that must never be reached."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener
    listener.close()


@pytest.fixture
def image_server(loopback_listener) -> Iterator[str]:
    """An image store on the trusted address; /redirect points at the loopback listener."""
    ImageServer.redirect_to = f"http://127.0.0.1:{loopback_listener.getsockname()[1]}/cat.png"
    httpd = http.server.ThreadingHTTPServer((TRUSTED_HOST, free_port()), ImageServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://{TRUSTED_HOST}:{httpd.server_address[1]}"
    httpd.shutdown()


def test_an_allowed_image_url_is_fetched_and_answered(client, image_server):
    assert chat(client, image_chat(f"{image_server}/cat.png")) == chat(client, image_chat(data_url(IMAGE)))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/cat.png",
        "http://10.0.0.1:{port}/cat.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/cat.png",
        "http://[::ffff:127.0.0.1]:{port}/cat.png",
        "http://localhost:{port}/cat.png",
        "redirect",
    ],
)
def test_image_urls_to_internal_addresses_are_refused_without_connecting(client, image_server, loopback_listener, url):
    port = loopback_listener.getsockname()[1]
    url = f"{image_server}/redirect" if url == "redirect" else url.format(port=port)
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, image_chat(url))
    assert raised.value.body["code"] == "image_url_forbidden"
    assert select.select([loopback_listener], [], [], 0.2)[0] == [], "the loopback listener was connected to"


# The engine dying: readiness fails for LLaVA alone, requests get 503 at once, and the service comes
# back with a new engine (this test ends the engine, so it runs last)

# vLLM's engine restarting on this busy 2-core machine: 40-90 s for the tiny LLaVA. A bound, not a speed.
ENGINE_RECOVERY_SECONDS = 300


def test_a_dead_engine_fails_readiness_and_answers_503_then_recovers(server, client):
    engine_port = server.env["MULTIMODAL_LLAVA_ENGINE_PORT"]
    found = subprocess.run(
        ["pgrep", "-f", f"vllm.entrypoints.openai.api_server.*--port {engine_port}"], capture_output=True, text=True
    )
    pids = [int(pid) for pid in found.stdout.split()]
    assert pids, "no vLLM server process found"
    for pid in pids:  # the server and its engine processes (they run in a session of their own)
        server_process = psutil.Process(pid)
        for process in [*server_process.children(recursive=True), server_process]:
            process.kill()
    killed = time.monotonic()

    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert ready.headers["retry-after"] == "1"
    assert ready.json()["families"] == {"clip": True, "llava": False, "whisper": True}
    # Per family: a deployment keeps serving CLIP and Whisper meanwhile.
    assert httpx.get(f"{server.url}/ready", params={"family": "clip"}, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/ready", params={"require": "any"}, timeout=10).status_code == 200
    with pytest.raises(openai.APIStatusError) as raised:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30).chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert raised.value.status_code == 503
    assert raised.value.response.headers["retry-after"] == "1"
    # The other families carry on.
    search = httpx.post(f"{server.url}/search", json={"image_data": b64(IMAGE), "texts": ["a"]}, timeout=30)
    assert search.status_code == 200

    # The LLaVA worker exits when its engine dies; BentoML's supervisor starts it again, with a new engine.
    deadline = killed + ENGINE_RECOVERY_SECONDS
    while httpx.get(f"{server.url}/ready", params={"family": "llava"}, timeout=10).status_code != 200:
        assert time.monotonic() < deadline, (
            f"LLaVA not back within {ENGINE_RECOVERY_SECONDS} s:\n{server.process.log_tail()}"
        )
        time.sleep(2)
    print(f"LLaVA ready again {time.monotonic() - killed:.0f} s after its engine was killed")
    assert isinstance(chat(client, [{"role": "user", "content": "hi"}]), str)  # a 200 from the new engine
