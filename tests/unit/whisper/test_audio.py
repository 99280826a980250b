"""Audio decoding limits and formats, and how long recordings are cut for batching."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from services.common.errors import APIError
from services.whisper.audio_decoding import SAMPLE_RATE, AudioLimits, decode_audio, sniff_format
from tests.helpers import png_bytes, random_image

LIMITS = AudioLimits(max_bytes=5_000_000, max_seconds=60.0, ffmpeg_timeout_seconds=30.0)
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="ffmpeg is not installed; `make test` installs it"
)


def tone(seconds: float, rate: int = SAMPLE_RATE, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encoded(samples: np.ndarray, rate: int = SAMPLE_RATE, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def ffmpeg_encode(wav: bytes, tmp_path: Path, suffix: str, *args: str) -> bytes:
    source, target = tmp_path / "in.wav", tmp_path / f"out.{suffix}"
    source.write_bytes(wav)
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(source), *args, str(target)], check=True)
    return target.read_bytes()


def raises(data: bytes, status: int, code: str, limits: AudioLimits = LIMITS) -> APIError:
    with pytest.raises(APIError) as raised:
        decode_audio(data, limits)
    assert (raised.value.status, raised.value.code) == (status, code), raised.value.message
    assert raised.value.param == "file"
    return raised.value


# In-process formats


def test_16khz_wav_decodes_to_the_samples_whisper_hears():
    wav = encoded(tone(1.5))
    decoded = decode_audio(wav, LIMITS)
    pcm16, _ = soundfile.read(io.BytesIO(wav), dtype="int16")  # what the file stores
    np.testing.assert_array_equal(decoded.samples, pcm16.astype(np.float32) / 32768.0)  # whisper.load_audio's scaling
    assert decoded.format == "wav" and decoded.samples.dtype == np.float32 and decoded.duration == 1.5


def test_other_rates_and_stereo_become_16khz_mono():
    stereo = np.stack([tone(2.0, 44_100), tone(2.0, 44_100)], axis=1)
    decoded = decode_audio(encoded(stereo, 44_100), LIMITS)
    assert len(decoded.samples) == 2 * SAMPLE_RATE
    np.testing.assert_allclose(decoded.samples[1000:-1000], tone(2.0)[1000:-1000], atol=2e-3)  # same tone, resampled


def test_flac_and_float_wav_decode_in_process():
    samples = tone(1.0)
    flac = decode_audio(encoded(samples, fmt="FLAC"), LIMITS)
    assert flac.format == "flac" and len(flac.samples) == SAMPLE_RATE
    floats = decode_audio(encoded(samples, subtype="FLOAT"), LIMITS)
    np.testing.assert_array_equal(floats.samples, samples)


def test_wav_over_the_duration_cap_is_refused_from_its_header():
    error = raises(encoded(tone(61.0)), 413, "audio_too_long")
    assert "61.0 s" in error.message


def test_truncated_wav_is_refused_not_half_transcribed():
    wav = encoded(tone(2.0))
    raises(wav[: len(wav) // 2], 400, "invalid_audio")
    raises(wav[:30], 400, "invalid_audio")  # cut inside the header


def test_wav_with_no_samples_is_empty():
    raises(encoded(np.zeros(0, dtype=np.float32)), 400, "empty_audio")


# Refused before any decoder runs


@pytest.mark.parametrize(
    "name,data,status,code",
    [
        ("zero bytes", b"", 400, "empty_file"),
        ("png", png_bytes(random_image(0)), 415, "unsupported_media_type"),
        ("text", b"hello, I am not audio at all" * 10, 415, "unsupported_media_type"),
        (
            "random bytes",
            bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)),
            415,
            "unsupported_media_type",
        ),
        ("wav header on junk", b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunkjunk", 400, "invalid_audio"),
    ],
)
def test_non_audio_is_refused(name, data, status, code):
    raises(data, status, code)


def test_upload_over_the_byte_cap_is_too_large():
    raises(encoded(tone(1.0)), 413, "file_too_large", AudioLimits(1000, 60.0, 30.0))


def test_formats_are_sniffed_from_magic_bytes():
    assert sniff_format(encoded(tone(0.1))) == "wav"
    assert sniff_format(encoded(tone(0.1), fmt="FLAC")) == "flac"
    assert sniff_format(b"ID3\x04rest") == "mp3"
    assert sniff_format(b"\xff\xfb\x90\x00") == "mp3"
    assert sniff_format(b"\xff\xf1\x50\x80") == "aac"
    assert sniff_format(b"OggS\x00\x02") == "ogg"
    assert sniff_format(b"\x00\x00\x00\x20ftypM4A ") == "mp4"
    assert sniff_format(b"\x1a\x45\xdf\xa3\x9f") == "webm"
    assert sniff_format(b"\x89PNG\r\n\x1a\n") is None


# Through ffmpeg


@needs_ffmpeg
def test_mp3_decodes_to_exactly_what_whisper_load_audio_gives(tmp_path):
    from whisper.audio import load_audio

    mp3 = ffmpeg_encode(encoded(tone(2.0, 22_050), 22_050), tmp_path, "mp3")
    path = tmp_path / "again.mp3"
    path.write_bytes(mp3)
    decoded = decode_audio(mp3, LIMITS)
    assert decoded.format == "mp3"
    np.testing.assert_array_equal(decoded.samples, load_audio(str(path)))


@needs_ffmpeg
@pytest.mark.parametrize(
    "suffix,args", [("ogg", ["-c:a", "libvorbis"]), ("m4a", ["-c:a", "aac"]), ("webm", ["-c:a", "libopus"])]
)
def test_ogg_m4a_and_webm_decode_through_ffmpeg(tmp_path, suffix, args):
    data = ffmpeg_encode(encoded(tone(1.0)), tmp_path, suffix, *args)
    decoded = decode_audio(data, LIMITS)
    assert abs(decoded.duration - 1.0) < 0.1


@needs_ffmpeg
def test_mp3_over_the_duration_cap_is_cut_off_and_refused(tmp_path):
    mp3 = ffmpeg_encode(encoded(np.zeros(SAMPLE_RATE * 5, dtype=np.float32)), tmp_path, "mp3")
    raises(mp3, 413, "audio_too_long", AudioLimits(5_000_000, 3.0, 30.0))


@needs_ffmpeg
def test_ffmpeg_gets_a_timeout(tmp_path):
    mp3 = ffmpeg_encode(encoded(tone(1.0)), tmp_path, "mp3")
    raises(mp3, 400, "audio_decode_timeout", AudioLimits(5_000_000, 60.0, 0.001))


@needs_ffmpeg
def test_corrupt_and_streamless_files_are_4xx(tmp_path):
    mp3 = ffmpeg_encode(encoded(tone(1.0)), tmp_path, "mp3")
    with pytest.raises(APIError) as raised:
        decode_audio(b"ID3" + bytes(np.random.default_rng(4).integers(0, 256, 2000, dtype=np.uint8)), LIMITS)
    assert raised.value.status == 400
    subprocess.run(
        [
            "ffmpeg",
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=black:s=16x16:d=1",
            str(tmp_path / "video.webm"),
        ],
        check=True,
    )
    raises((tmp_path / "video.webm").read_bytes(), 415, "unsupported_media_type")
    assert decode_audio(mp3[: len(mp3) // 2], LIMITS).duration > 0  # a cut mp3 is frames that are there


# Cutting long recordings (services.whisper.api)


def test_recordings_up_to_30_seconds_are_one_chunk():
    from services.whisper.chunking import plan_chunks

    assert plan_chunks(tone(30.0)) == [(0, 30 * SAMPLE_RATE)]
    assert plan_chunks(tone(0.2)) == [(0, int(0.2 * SAMPLE_RATE))]


def test_long_recordings_are_cut_in_the_pause_before_30_seconds():
    from services.whisper.chunking import plan_chunks

    rng = np.random.default_rng(5)
    speech = (0.3 * rng.standard_normal(100 * SAMPLE_RATE)).astype(np.float32)
    pauses = [27.0, 55.0, 82.0]  # seconds where 400 ms of silence start
    for pause in pauses:
        speech[int(pause * SAMPLE_RATE) : int((pause + 0.4) * SAMPLE_RATE)] = 0
    chunks = plan_chunks(speech)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(speech)
    assert all(end == next_start for (_, end), (next_start, _) in zip(chunks, chunks[1:], strict=False))
    assert all(0 < end - start <= 30 * SAMPLE_RATE for start, end in chunks)
    cuts = [end / SAMPLE_RATE for _, end in chunks[:-1]]
    assert len(cuts) == 3
    for cut, pause in zip(cuts, pauses, strict=True):
        assert pause <= cut <= pause + 0.4, (cut, pause)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_samples_are_invalid_audio(bad):
    samples = tone(1.0)
    samples[100] = bad
    raises(encoded(samples, subtype="FLOAT"), 400, "invalid_audio")


@pytest.mark.parametrize("seconds", [0.5, 10.0, 29.99, 30.0, 45.0])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_the_language_detection_window_is_transcribe_s_first_window_exactly(seconds, n_mels):
    """The window detection encodes, padded only as far as its frames reach, equals the one
    transcribe would make from the first 30 s padded by 30 s of zeros, to the bit; for a recording
    of 30 s or less that is transcribe's own first window. The loud ending makes the frames that
    straddle 30 s the loudest, so the normalising maximum is one that the padding could have moved."""
    from whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

    from services.whisper.api import detection_window

    rng = np.random.default_rng(int(seconds * 100) + n_mels)
    samples = 0.05 * rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    samples[: len(samples) // 2] += tone(seconds / 2)[: len(samples) // 2]
    samples[N_SAMPLES - 300 : N_SAMPLES] *= 40  # empty where the recording is shorter
    transcribes = pad_or_trim(log_mel_spectrogram(samples[:N_SAMPLES], n_mels, padding=N_SAMPLES), N_FRAMES)
    assert torch.equal(detection_window(samples, n_mels), transcribes)
