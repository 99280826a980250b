"""Safe decoding of client-supplied audio to what Whisper hears: mono float32 at 16 kHz.

Like images (``services.common.image_validation``), every upload is hostile until proven otherwise:
- the byte size is capped before anything is parsed (OpenAI's 25 MB by default);
- the format is recognised from the file's own magic bytes, never from its name or the
  client's content type: anything else is 415 without any decoder touching it;
- WAV and FLAC are decoded in-process (libsndfile through ``soundfile``, resampled with
  ``soxr``); the duration cap is checked from the header before samples are read, and a WAV
  whose data chunk is shorter than its header says is refused (libsndfile would silently
  return the part that is there);
- other formats (mp3, ogg, m4a/mp4, webm/mkv, AAC) go through ``ffmpeg`` with the demuxer
  forced to the sniffed one (so playlist or concat demuxers that open other files or URLs
  are never chosen), file access only, a wall-clock timeout, and ``-t`` just past the cap
  so a small file that expands to hours is cut off rather than decoded whole.
The ffmpeg command is openai-whisper's own ``load_audio`` command plus those limits, so mp3s
decode to exactly the samples ``whisper.transcribe(path)`` would hear.
Empty audio is 400, non-audio 415, too large or too long 413.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from services.common.errors import APIError

SAMPLE_RATE = 16_000  # what openai-whisper's models take
IN_PROCESS = ("wav", "flac")
# Our format name -> ffmpeg's demuxer for it.
FFMPEG_DEMUXERS = {"mp3": "mp3", "aac": "aac", "ogg": "ogg", "mp4": "mov", "webm": "matroska"}
ACCEPTED = "wav, flac, mp3, ogg, m4a/mp4, webm/mkv, aac"


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    format: str

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int
    max_seconds: float
    ffmpeg_timeout_seconds: float


def sniff_format(data: bytes) -> str | None:
    """The audio format from the file's magic bytes, or None for anything we do not accept."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:3] == b"ID3":
        return "mp3"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        layer = (data[1] >> 1) & 0b11
        return "aac" if layer == 0 else "mp3"  # layer bits 00 mark an ADTS (AAC) header
    if data[:4] == b"OggS":
        return "ogg"
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: webm, mkv
        return "webm"
    return None


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, message, code="invalid_audio", param=param)


def _too_long(seconds: float, limits: AudioLimits, param: str) -> APIError:
    message = f"audio is {seconds:.1f} s long; at most {limits.max_seconds:g} s are accepted"
    return APIError(413, message, code="audio_too_long", param=param)


def _check_wav_not_truncated(data: bytes, param: str) -> None:
    """Walk the RIFF chunks to ``data`` and check that all the bytes it declares are there."""
    if data[:4] != b"RIFF":
        return  # RF64 keeps its sizes elsewhere; libsndfile checks it
    position = 12
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        if chunk == b"data":
            # Streaming writers, which cannot seek back, leave the size as 0 or 0xFFFFFFFF.
            if size not in (0, 0xFFFFFFFF) and position + 8 + size > len(data):
                present = len(data) - position - 8
                raise _invalid(f"WAV file is truncated: {size} bytes of audio declared, {present} present", param)
            return
        position += 8 + size + (size & 1)
    raise _invalid("WAV file has no audio data", param)


def _decode_in_process(data: bytes, fmt: str, limits: AudioLimits, param: str) -> np.ndarray:
    import soundfile
    import soxr

    if fmt == "wav":
        _check_wav_not_truncated(data, param)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            rate, declared = sound.samplerate, sound.frames
            if rate <= 0:
                raise _invalid("audio has no sample rate", param)
            if declared / rate > limits.max_seconds:
                raise _too_long(declared / rate, limits, param)
            # Read no more than the cap allows even when the header's count is wrong.
            cap = int(limits.max_seconds * rate) + 1
            samples = sound.read(frames=min(declared, cap) if declared > 0 else cap, dtype="float32", always_2d=True)
    except APIError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
        raise _invalid(f"{fmt.upper()} audio could not be decoded: {exc}", param) from None
    if len(samples) / rate > limits.max_seconds:
        raise _too_long(len(samples) / rate, limits, param)
    if 0 < len(samples) < declared:
        raise _invalid(f"{fmt.upper()} file is truncated", param)
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE and len(mono):
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_with_ffmpeg(data: bytes, fmt: str, limits: AudioLimits, param: str) -> np.ndarray:
    with tempfile.NamedTemporaryFile(prefix="upload-", suffix=f".{fmt}") as upload:
        upload.write(data)
        upload.flush()
        # openai-whisper's load_audio command, with the input demuxer forced, the first audio
        # stream mapped, file access only and the output cut just past the cap.
        command = [
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
            "-protocol_whitelist", "file", "-f", FFMPEG_DEMUXERS[fmt], "-i", upload.name,
            "-map", "0:a:0", "-vn", "-sn", "-dn", "-t", f"{limits.max_seconds + 1:g}",
            "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-",
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, timeout=limits.ffmpeg_timeout_seconds, check=False)
        except subprocess.TimeoutExpired:
            message = f"audio could not be decoded within {limits.ffmpeg_timeout_seconds:g} s"
            raise APIError(400, message, code="audio_decode_timeout", param=param) from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").replace(upload.name, "input").strip()
        if "matches no streams" in detail:
            raise APIError(415, "the file has no audio stream", code="unsupported_media_type", param=param)
        reason = detail.splitlines()[0] if detail else f"ffmpeg exited with {done.returncode}"
        raise _invalid(f"{fmt} audio could not be decoded: {reason}", param)
    samples = np.frombuffer(done.stdout, np.int16).flatten().astype(np.float32) / 32768.0
    if len(samples) > limits.max_seconds * SAMPLE_RATE:
        raise _too_long(len(samples) / SAMPLE_RATE, limits, param)
    return samples


def decode_audio(data: bytes, limits: AudioLimits, *, param: str = "file") -> DecodedAudio:
    """Decode an upload, or raise the APIError that tells the client what is wrong with it."""
    if not data:
        raise APIError(400, "audio file is empty", code="empty_file", param=param)
    if len(data) > limits.max_bytes:
        raise APIError(413, f"audio file is larger than {limits.max_bytes} bytes", code="file_too_large", param=param)
    fmt = sniff_format(data)
    if fmt is None:
        message = f"not an audio file in an accepted format ({ACCEPTED})"
        raise APIError(415, message, code="unsupported_media_type", param=param)
    if fmt in IN_PROCESS:
        samples = _decode_in_process(data, fmt, limits, param)
    else:
        samples = _decode_with_ffmpeg(data, fmt, limits, param)
    if len(samples) == 0:
        raise APIError(400, "audio file contains no audio", code="empty_audio", param=param)
    if not np.isfinite(samples).all():  # a float WAV can hold NaN or infinity; no decoder output should
        raise _invalid("audio samples must be finite numbers (the file holds NaN or infinity)", param)
    return DecodedAudio(samples=samples, format=fmt)
