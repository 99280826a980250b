"""The Whisper routes against a real ``bentoml serve`` (entry service + Whisper service processes).

Speech is made at test time by espeak-ng, in WAV (16 kHz, so that openai-whisper's own
ffmpeg loading hears the very samples the service decodes in-process) and in mp3. The
reference is openai-whisper's ``model.transcribe`` on the same weights in this process. The
tiny model's words are nonsense, but they differ from clip to clip (see bentos/tiny/whisper.py),
so a window decoded for the wrong request, or mangled by batching, shows.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import openai
import pytest
import soundfile
import srt
import webvtt

from tests.helpers import metric_samples, metric_value, png_bytes, random_image

pytestmark = pytest.mark.integration
MAX_SECONDS = 200  # the server's duration cap: above the 3-minute recording
SENTENCES = [
    "Hello world, this is a test of the speech recognition service.",
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "One two three four five six seven eight nine ten.",
    "Speech recognition turns spoken words into text.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Batching windows across requests makes the service faster.",
    "Good morning, how are you today?",
]
PARAGRAPH = (
    "The committee met on Tuesday to review the budget for the coming year. Several members asked questions "
    "about travel costs, and the chair promised a written answer before the next meeting. After a short break, "
    "the discussion turned to the new library, which will open in the spring. "
)


# Speech, servers and the reference


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def speak(text: str, path: Path) -> Path:
    """espeak-ng's speech (22.05 kHz) resampled to a 16 kHz mono 16-bit WAV."""
    raw = path.with_suffix(".raw.wav")
    _run("espeak-ng", "-w", str(raw), text)
    _run("ffmpeg", "-y", "-loglevel", "error", "-i", str(raw), "-ar", "16000", "-ac", "1", str(path))
    return path


def to_mp3(wav: Path) -> Path:
    mp3 = wav.with_suffix(".mp3")
    _run("ffmpeg", "-y", "-loglevel", "error", "-i", str(wav), "-b:a", "64k", str(mp3))
    return mp3


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; `make test` installs it")
    folder = tmp_path_factory.mktemp("speech")
    clips = {f"clip{i}": speak(text, folder / f"clip{i}.wav") for i, text in enumerate(SENTENCES)}
    short = speak(" ".join(SENTENCES[:2]), folder / "short.wav")
    long = speak(PARAGRAPH * 12, folder / "long.wav")
    return {**clips, "short": short, "short_mp3": to_mp3(short), "long": long}


@pytest.fixture(scope="module")
def server(serve_product):
    # A generous request timeout: on a loaded 2-core machine the 3-minute recording can take
    # tens of seconds, and a timeout would say nothing about the service.
    # The GPU's default decoder (windows join the running batch step by step), run eagerly here,
    # so that every parity test below goes through it; fair_server keeps the CPU's default.
    return serve_product(
        MULTIMODAL_FAMILIES="whisper",
        MULTIMODAL_MAX_AUDIO_SECONDS=str(MAX_SECONDS),
        MULTIMODAL_REQUEST_TIMEOUT_SECONDS="300",
        MULTIMODAL_WHISPER_DECODER="continuous",
    )


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """openai-whisper's model on the service's weights, used as its README shows."""
    import whisper

    model = whisper.load_model(str(Path(bentoml.models.get("tiny-whisper").path) / "model.pt"), device="cpu")

    def transcribe(audio, **options):
        return model.transcribe(audio, temperature=0, condition_on_previous_text=False, fp16=False, **options)

    transcribe.model = model
    return transcribe


def duration_of(path: Path) -> float:
    return soundfile.info(str(path)).duration


def post_audio(
    server, route: str, data: bytes, filename: str = "audio.wav", field: str = "file", **fields: str
) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", files={field: (filename, data)}, data=fields, timeout=120)


def assert_timeline(spans: list[tuple[float, float]], duration: float) -> None:
    """Monotonic, and inside the audio."""
    assert spans, "no timestamps"
    for start, end in spans:
        assert 0 <= start <= end <= duration + 1e-6, (start, end, duration)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    assert starts == sorted(starts) and ends == sorted(ends), spans


def vtt_seconds(stamp: str) -> float:
    hours, minutes, seconds = ([0] + [float(part) for part in stamp.split(":")])[-3:]
    return 3600 * hours + 60 * minutes + seconds


# The official OpenAI SDK, every response format


def test_every_response_format_through_the_openai_sdk(client, speech):
    path, duration = speech["short"], duration_of(speech["short"])

    def create(response_format: str, **options):
        with path.open("rb") as file:
            return client.audio.transcriptions.create(
                model="whisper-1", file=file, response_format=response_format, **options
            )

    as_json = create("json")
    text = as_json.text
    assert text and text == text.strip()
    assert as_json.usage.type == "duration" and as_json.usage.seconds == np.ceil(duration)
    assert create("text").strip() == text

    verbose = create("verbose_json")
    assert verbose.text == text and verbose.words is None
    assert verbose.duration == pytest.approx(duration, abs=0.01)
    assert verbose.language.isalpha() and len(verbose.language) > 2  # a language's name, as OpenAI gives it
    assert [s.id for s in verbose.segments] == list(range(len(verbose.segments)))
    assert_timeline([(s.start, s.end) for s in verbose.segments], duration)

    cues = list(srt.parse(create("srt")))
    assert [c.index for c in cues] == list(range(1, len(verbose.segments) + 1))
    assert [c.content for c in cues] == [s.text.strip() for s in verbose.segments]
    assert_timeline([(c.start.total_seconds(), c.end.total_seconds()) for c in cues], duration)
    for cue, segment in zip(cues, verbose.segments, strict=True):
        assert cue.start.total_seconds() == pytest.approx(segment.start, abs=0.001)

    captions = webvtt.from_string(create("vtt"))
    assert [c.text for c in captions] == [s.text.strip() for s in verbose.segments]
    assert_timeline([(vtt_seconds(c.start), vtt_seconds(c.end)) for c in captions], duration)


def test_word_timestamps_equal_openai_whispers_alignment(client, speech, reference):
    path, duration = speech["short"], duration_of(speech["short"])
    with path.open("rb") as file:
        verbose = client.audio.transcriptions.create(
            model="whisper-1", file=file, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    expected = reference(str(path), word_timestamps=True)
    assert verbose.text == expected["text"].strip()
    expected_words = [w for s in expected["segments"] for w in s["words"]]
    assert [w.word for w in verbose.words] == [w["word"] for w in expected_words] and verbose.words
    clamped = [(min(w["start"], duration), min(w["end"], duration)) for w in expected_words]
    np.testing.assert_allclose([(w.start, w.end) for w in verbose.words], clamped, atol=0.002)
    assert_timeline([(w.start, w.end) for w in verbose.words], duration)
    assert_timeline([(s.start, s.end) for s in verbose.segments], duration)

    with path.open("rb") as file:
        words_only = client.audio.transcriptions.create(
            model="whisper-1", file=file, response_format="verbose_json", timestamp_granularities=["word"]
        )
    assert words_only.segments is None and words_only.words == verbose.words


# Parity with openai-whisper's transcribe on the same weights


@pytest.mark.parametrize("kind", ["short", "short_mp3"])
def test_text_and_language_equal_transcribe(client, server, speech, reference, kind):
    path = speech[kind]
    expected = reference(str(path))  # openai-whisper decodes the file itself (ffmpeg)
    with path.open("rb") as file:
        assert client.audio.transcriptions.create(model="whisper-1", file=file).text == expected["text"].strip()
    native = post_audio(server, "/transcribe", path.read_bytes(), filename=path.name)
    assert native.status_code == 200, native.text
    assert native.json() == {"text": expected["text"].strip(), "language": expected["language"]}
    # The original design's clients upload under the field name `audio`.
    original = post_audio(server, "/transcribe", path.read_bytes(), filename=path.name, field="audio")
    assert original.status_code == 200, original.text
    assert original.json() == native.json()


def test_language_and_prompt_reach_transcribe(client, speech, reference):
    path = speech["clip2"]
    expected = reference(str(path), language="fr", initial_prompt="Budget meeting.")
    with path.open("rb") as file:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=file, language="fr", prompt="Budget meeting.", response_format="verbose_json"
        )
    assert result.text == expected["text"].strip()
    assert result.language == "french"


def test_translation_equals_transcribe_with_the_translate_task(client, speech, reference):
    path = speech["clip5"]
    expected = reference(str(path), task="translate")
    with path.open("rb") as file:
        result = client.audio.translations.create(model="whisper-1", file=file, response_format="verbose_json")
    assert result.text == expected["text"].strip()
    assert result.language == "english"  # OpenAI's: the language of the translation
    with path.open("rb") as file:
        assert (
            client.audio.translations.create(model="whisper-1", file=file, response_format="text").strip()
            == result.text
        )


# Adaptive batching across requests


def test_concurrent_requests_are_batched_without_changing_results(server, speech):
    clips = [speech[f"clip{i}"].read_bytes() for i in range(8)]

    def transcribe(data: bytes) -> dict:
        response = post_audio(server, "/transcribe", data)
        assert response.status_code == 200, response.text
        return response.json()

    start = server.metrics()
    sequential = [transcribe(data) for data in clips]
    before = server.metrics()
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(transcribe, clips))
    after = server.metrics()

    assert concurrent == sequential
    assert len({r["text"] for r in sequential}) >= 6  # different audio, different text: a mix-up would show

    def batches(text: str, le: str | None = None) -> float:
        if le is None:
            return metric_value(text, "whisper_batch_size_count", kind="decode")
        return metric_value(text, "whisper_batch_size_bucket", kind="decode", le=le)

    total = batches(after) - batches(before)
    singles = batches(after, "1.0") - batches(before, "1.0")
    assert total - singles > 0, f"no decode batch larger than 1 among {total}"
    assert total < 8  # 8 requests' windows joined the decoder in fewer prefills

    def windows(text: str) -> float:
        return metric_value(text, "whisper_batch_size_sum", kind="decode")

    # the same windows, decoded together: none lost or decoded twice
    assert windows(after) - windows(before) == windows(before) - windows(start) >= 8


# A long recording: cut at pauses, chunks batched, stitched on one time line


def test_three_minute_recording_is_covered_end_to_end(client, server, speech, reference):
    import whisper
    from whisper.audio import N_FRAMES, N_SAMPLES

    from services.whisper.chunking import plan_chunks

    path, duration = speech["long"], duration_of(speech["long"])
    assert 170 <= duration <= MAX_SECONDS
    before = server.metrics()
    started = time.perf_counter()
    with path.open("rb") as file:
        result = client.audio.transcriptions.create(model="whisper-1", file=file, response_format="verbose_json")
    elapsed = time.perf_counter() - started
    after = server.metrics()

    spans = [(s.start, s.end) for s in result.segments]
    assert_timeline(spans, duration)
    for second in range(0, int(duration) - 30, 30):  # every 30 s of the recording has segments
        assert any(start < second + 30 and end >= second for start, end in spans), (second, spans)
    assert spans[0][0] < 30 and spans[-1][1] > duration - 30

    # The documented algorithm, run with openai-whisper itself: language from the first
    # 30 s, then transcribe on each chunk, texts joined.
    samples = whisper.load_audio(str(path))
    mel = whisper.pad_or_trim(whisper.log_mel_spectrogram(samples[:N_SAMPLES], padding=N_SAMPLES), N_FRAMES)
    _, probabilities = reference.model.detect_language(mel)
    language = max(probabilities, key=probabilities.get)
    chunks = plan_chunks(samples)
    assert len(chunks) == 7
    expected = "".join(reference(samples[a:b], language=language)["text"] for a, b in chunks).strip()
    assert result.text == expected

    # The chunks' windows were decoded together, not one after another.
    passes = metric_value(after, "whisper_batch_size_count", kind="decode") - metric_value(
        before, "whisper_batch_size_count", kind="decode"
    )
    windows = metric_value(after, "whisper_batch_size_sum", kind="decode") - metric_value(
        before, "whisper_batch_size_sum", kind="decode"
    )
    assert windows >= len(chunks) and passes < windows, (passes, windows)
    print(f"\n3-minute recording: {elapsed:.1f} s, {windows:.0f} windows in {passes:.0f} batched passes")


def test_a_prompt_reaches_only_the_first_chunk_of_a_long_recording(server, speech, reference):
    """transcribe (conditioning off) prompts its first window only, so the parallel mode prompts
    its first chunk only: the text is the first chunk's transcribe with the prompt, then the
    other chunks' without it."""
    import whisper

    from services.whisper.chunking import plan_chunks

    path, prompt = speech["long"], "Minutes of the harbour committee."
    samples = whisper.load_audio(str(path))
    chunks = plan_chunks(samples)
    language = "en"  # given, so that the expected text needs no language detection
    texts = [
        reference(samples[a:b], language=language, initial_prompt=prompt if i == 0 else None)["text"]
        for i, (a, b) in enumerate(chunks)
    ]
    fields = {"model": "whisper-1", "language": language, "prompt": prompt, "long_audio": "parallel"}
    response = post_audio(server, "/v1/audio/transcriptions", path.read_bytes(), "long.wav", **fields)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == "".join(texts).strip()
    # On these weights a prompt changes a chunk's text, so a prompt at every chunk would differ.
    a, b = chunks[1]
    assert reference(samples[a:b], language=language, initial_prompt=prompt)["text"] != texts[1]


def test_sequential_long_audio_equals_transcribe_on_the_whole_recording(server, speech, reference):
    """long_audio=sequential: transcribe's own seeking over the whole file, so its text and
    segments are those of one transcribe() call on the same weights, not of the chunked plan.
    The one difference is the product's: times are clamped to the audio's duration (transcribe's
    last timestamp can fall in the padding past the end)."""
    import whisper

    path = speech["long"]
    expected = reference(whisper.load_audio(str(path)))
    fields = {"model": "whisper-1", "response_format": "verbose_json", "long_audio": "sequential"}
    response = post_audio(server, "/v1/audio/transcriptions", path.read_bytes(), "long.wav", **fields)
    assert response.status_code == 200, response.text
    result = response.json()
    duration = result["duration"]
    assert result["text"] == expected["text"].strip()
    got = [(s["start"], s["end"], s["text"]) for s in result["segments"]]
    want = [(min(s["start"], duration), min(s["end"], duration), s["text"]) for s in expected["segments"]]
    assert len(got) == len(want) > 6  # more than one window's worth: transcribe sought through the file
    for (start, end, text), (start_want, end_want, text_want) in zip(got, want, strict=True):
        assert text == text_want
        assert start == pytest.approx(start_want, abs=1e-3) and end == pytest.approx(end_want, abs=1e-3)


def test_sequential_long_audio_conditioned_on_previous_text_equals_transcribe(server, speech, reference):
    """With condition_on_previous_text, each window is prompted with the text before it, as in
    transcribe's default: the service's text is that of one such transcribe() call."""
    import whisper

    path = speech["long"]
    samples = whisper.load_audio(str(path))
    options = {"temperature": 0, "fp16": False, "language": "en"}
    expected = reference.model.transcribe(samples, condition_on_previous_text=True, **options)["text"].strip()
    unconditioned = reference.model.transcribe(samples, condition_on_previous_text=False, **options)["text"].strip()
    assert expected != unconditioned  # on these weights the conditioning shows in the text
    fields = {"model": "whisper-1", "language": "en", "long_audio": "sequential", "condition_on_previous_text": "true"}
    response = post_audio(server, "/v1/audio/transcriptions", path.read_bytes(), "long.wav", **fields)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == expected


def test_an_unknown_long_audio_mode_is_a_400(server, speech):
    data = speech["short"].read_bytes()
    response = post_audio(server, "/v1/audio/transcriptions", data, "short.wav", model="whisper-1", long_audio="fast")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"
    assert response.json()["error"]["param"] == "long_audio"


# Bad audio and bad requests: a 4xx in the one error shape, never a 500


def _wav(samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _silent_mp3(seconds: int) -> bytes:
    done = subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "anullsrc=r=8000:cl=mono",
            "-t",
            str(seconds),
            "-b:a",
            "8k",
            "-f",
            "mp3",
            "-",
        ],
        check=True,
        capture_output=True,
    )
    return done.stdout


SPEECHLESS_WAV = _wav(np.zeros(16_000, dtype=np.float32))
BAD_AUDIO = {
    "zero bytes": (b"", 400, "empty_file"),
    "random bytes": (
        bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)),
        415,
        "unsupported_media_type",
    ),
    "png": (png_bytes(random_image(0)), 415, "unsupported_media_type"),
    "text": (b"just some text, not audio\n" * 20, 415, "unsupported_media_type"),
    "truncated wav": (SPEECHLESS_WAV[: len(SPEECHLESS_WAV) // 2], 400, "invalid_audio"),
    "wav without samples": (_wav(np.zeros(0, dtype=np.float32)), 400, "empty_audio"),
    "wav over the duration cap": (
        _wav(np.zeros(8000 * (MAX_SECONDS + 5), dtype=np.float32), 8000, "PCM_U8"),
        413,
        "audio_too_long",
    ),
    "mp3 over the duration cap": (_silent_mp3(MAX_SECONDS + 5), 413, "audio_too_long"),
    "corrupt mp3": (b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8, 400, "invalid_audio"),
    "over 25 MB": (b"RIFF" + bytes(25 * 2**20), 413, "file_too_large"),
}


def test_transcribe_without_an_upload_is_400(server):
    assert_error_shape(httpx.post(f"{server.url}/transcribe", data={"language": "en"}, timeout=30), 400, "missing_file")


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("name", list(BAD_AUDIO))
def test_bad_audio_is_a_4xx_in_the_error_shape(server, name):
    data, status, code = BAD_AUDIO[name]
    assert_error_shape(post_audio(server, "/v1/audio/transcriptions", data, model="whisper-1"), status, code)
    assert_error_shape(post_audio(server, "/transcribe", data), status, code)


def test_bad_requests_are_4xx_in_the_error_shape(server):
    wav = SPEECHLESS_WAV
    route = "/v1/audio/transcriptions"
    assert_error_shape(post_audio(server, route, wav, model="whisper-9"), 404, "model_not_found")
    assert_error_shape(post_audio(server, route, wav, model="whisper-1", language="klingon"), 400, "invalid_language")
    assert_error_shape(post_audio(server, route, wav, model="whisper-1", response_format="xml"), 400)
    assert_error_shape(post_audio(server, route, wav, model="whisper-1", temperature="2"), 400)
    assert_error_shape(post_audio(server, route, wav, model="whisper-1", **{"timestamp_granularities[]": "word"}), 400)
    assert_error_shape(post_audio(server, route, wav), 400)  # no model
    response = httpx.post(f"{server.url}{route}", data={"model": "whisper-1", "file": "not a file"}, timeout=30)
    assert_error_shape(response, 400)
    response = httpx.post(f"{server.url}{route}", json={"model": "whisper-1"}, timeout=30)
    assert_error_shape(response, 400)


def test_openai_sdk_raises_its_own_errors(client):
    with pytest.raises(openai.APIStatusError) as raised:
        client.audio.transcriptions.create(model="whisper-1", file=("image.png", png_bytes(random_image(1))))
    assert raised.value.status_code == 415
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-9", file=("a.wav", SPEECHLESS_WAV))


# Health, models and metrics


def test_models_readiness_and_metrics(server, speech):
    assert httpx.get(f"{server.url}/ready", timeout=10).json() == {"status": "ready", "families": {"whisper": True}}
    assert "tiny-whisper" in [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    response = post_audio(server, "/v1/audio/transcriptions", speech["clip7"].read_bytes(), model="whisper-1")
    assert response.status_code == 200, response.text
    text = server.metrics()
    assert metric_value(text, "whisper_requests_total", endpoint="/v1/audio/transcriptions", status="200") >= 1
    assert metric_value(text, "whisper_request_duration_seconds_count", endpoint="/v1/audio/transcriptions") >= 1
    assert metric_value(text, "whisper_audio_seconds_total", task="transcribe") >= duration_of(speech["clip7"])
    assert metric_value(text, "whisper_real_time_factor_count", task="transcribe") >= 1
    for stage in ("decode_audio", "transcribe"):  # clip7 is under 30 s: no separate language detection
        assert metric_value(text, "whisper_stage_duration_seconds_count", stage=stage) >= 1
    assert metric_value(text, "whisper_batch_size_count", kind="decode") >= 1
    assert metric_samples(text, "queue_depth", model="whisper") == [0.0]  # nothing waiting once answered
    assert metric_value(text, "whisper_requests_total", status="500") == 0


# Fair turns across requests, and a bounded queue (services/whisper/window_scheduler.py)

FAIR_QUEUE_WINDOWS = 11  # the 3-minute recording (7 chunks) and four short clips fit; two long ones do not


@pytest.fixture(scope="module")
def fair_server(serve_product):
    # Small batches (BentoML's smallest is 2), so a long recording's windows fill several.
    return serve_product(
        MULTIMODAL_FAMILIES="whisper",
        MULTIMODAL_MAX_AUDIO_SECONDS=str(MAX_SECONDS),
        MULTIMODAL_REQUEST_TIMEOUT_SECONDS="600",
        MULTIMODAL_WHISPER_MAX_BATCH_SIZE="2",
        MULTIMODAL_WHISPER_MAX_QUEUED_WINDOWS=str(FAIR_QUEUE_WINDOWS),
    )


def whisper_queue_depth(server) -> float:
    return sum(metric_samples(server.metrics(), "queue_depth", model="whisper"))


def start_long_upload(pool: ThreadPoolExecutor, server, speech, finished: list[str]):
    """The 3-minute recording in flight, returned once its chunks' windows are queued."""

    def long() -> httpx.Response:
        response = post_audio(server, "/transcribe", speech["long"].read_bytes(), language="en")
        finished.append("long")
        return response

    upload = pool.submit(long)
    while whisper_queue_depth(server) < 2:  # its chunks' windows, not just the upload, are waiting
        assert not upload.done(), upload.result().text
        time.sleep(0.1)
    return upload


def test_short_clips_finish_before_a_long_recording_sent_first(fair_server, speech, reference):
    shorts = ["clip1", "clip3", "clip5", "clip7"]
    expected = {name: reference(str(speech[name]), language="en")["text"].strip() for name in shorts}
    finished: list[str] = []  # names in the order their responses came back

    def short(name: str) -> httpx.Response:
        response = post_audio(fair_server, "/transcribe", speech[name].read_bytes(), language="en")
        finished.append(name)
        return response

    with ThreadPoolExecutor(max_workers=1 + len(shorts)) as pool:
        long = start_long_upload(pool, fair_server, speech, finished)
        short_responses = dict(zip(shorts, pool.map(short, shorts), strict=True))
        long_response = long.result()

    assert long_response.status_code == 200, long_response.text
    assert long_response.json()["text"]
    for name, response in short_responses.items():
        assert response.status_code == 200, response.text
        assert response.json()["text"] == expected[name]  # taking turns changes no transcript
    # The long recording's windows were queued first; the short clips still finished first.
    assert finished[-1] == "long", finished
    assert sorted(finished[:-1]) == sorted(shorts)


def test_past_the_queue_bound_a_transcription_gets_429_with_retry_after(fair_server, speech):
    finished: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        long = start_long_upload(pool, fair_server, speech, finished)
        # 7 windows admitted; 7 more would exceed the bound of 11.
        refused = post_audio(fair_server, "/v1/audio/transcriptions", speech["long"].read_bytes(), model="whisper-1")
        # A short clip still fits beside the long recording.
        fits = post_audio(fair_server, "/v1/audio/transcriptions", speech["clip2"].read_bytes(), model="whisper-1")
        long_response = long.result()

    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert fits.status_code == 200, fits.text
    assert long_response.status_code == 200, long_response.text
    assert whisper_queue_depth(fair_server) == 0
    text = fair_server.metrics()
    assert metric_value(text, "whisper_requests_total", endpoint="/v1/audio/transcriptions", status="429") == 1


def test_the_image_library_is_not_served_without_clip(server):
    """The library's vectors are CLIP's: a deployment without CLIP answers its routes 404 not_served."""
    for method, route, body in (
        ("GET", "/v1/library", None),
        ("POST", "/v1/library/photos/search", {"text": "a cat"}),
        ("POST", "/v1/library/photos/images", {"images": [{"image": "aGVsbG8="}]}),
    ):
        response = httpx.request(method, f"{server.url}{route}", json=body, timeout=30)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_served"
