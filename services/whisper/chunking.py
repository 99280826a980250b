"""Long recordings: cut at quiet points before decoding, stitched on one time line after.

Why cut rather than seek: see ``services.whisper.api``'s docstring. Cuts are placed at the
quietest 200 ms of the last 5 s before each 30 s limit, so they fall in a pause between words
when there is one; stitching shifts each chunk's segments and words by the chunk's start and
keeps timestamps inside the audio and non-decreasing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from whisper.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

CUT_SEARCH_SAMPLES = 5 * SAMPLE_RATE  # where a cut may go: the last 5 s before the 30 s limit
ENERGY_FRAME = SAMPLE_RATE // 50  # 20 ms
QUIET_FRAMES = 10  # 200 ms: a pause between words, not a stop consonant inside one


def plan_chunks(samples: np.ndarray) -> list[tuple[int, int]]:
    """Cut a recording into [start, end) sample ranges of at most 30 s, each cut at a quiet point."""
    spans, start, total = [], 0, len(samples)
    while total - start > N_SAMPLES:
        low = start + N_SAMPLES - CUT_SEARCH_SAMPLES
        frames = samples[low : start + N_SAMPLES].reshape(-1, ENERGY_FRAME).astype(np.float64)
        energy = np.convolve((frames**2).mean(axis=1), np.ones(QUIET_FRAMES) / QUIET_FRAMES, mode="valid")
        quietest = int(np.argmin(energy))  # first of QUIET_FRAMES frames; cut in their middle
        cut = low + (quietest + QUIET_FRAMES // 2) * ENERGY_FRAME
        spans.append((start, cut))
        start = cut
    spans.append((start, total))
    return spans


SEGMENT_FIELDS = ("text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob")


def _clamp(value: float, low: float, high: float) -> float:
    return round(min(max(value, low), high), 3)


def stitch(chunks: list[tuple[int, int]], results: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Segments (and their words) of every chunk on one time line, clamped and non-decreasing."""
    segments: list[dict[str, Any]] = []
    last_start = last_word_start = 0.0
    for (begin, end), result in zip(chunks, results, strict=True):
        offset, limit = begin / SAMPLE_RATE, min(end / SAMPLE_RATE, duration)
        for segment in result["segments"]:
            if not segment["text"].strip():
                continue  # transcribe blanks instantaneous or empty segments; they carry nothing
            start = _clamp(offset + segment["start"], last_start, limit)
            words = []
            for word in segment.get("words", []):
                word_start = _clamp(offset + word["start"], last_word_start, limit)
                word_end = _clamp(offset + word["end"], word_start, limit)
                words.append({"word": word["word"], "start": word_start, "end": word_end})
                last_word_start = word_start
            segments.append(
                {
                    **{k: segment[k] for k in SEGMENT_FIELDS},
                    "id": len(segments),
                    "seek": segment["seek"] + begin // HOP_LENGTH,
                    "start": start,
                    "end": _clamp(offset + segment["end"], start, limit),
                    "words": words,
                }
            )
            last_start = start
    return segments
