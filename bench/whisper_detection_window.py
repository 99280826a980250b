"""The language-detection window's log-mel on the CPU: padded as transcribe pads (30 s of
zeros) against the service's ``detection_window`` (400 samples), on the same speech.

    python -m bench.whisper_detection_window --speech .speech   # after: python -m bench.whisper_gpu speech

Each form runs on 30 s slices of the speech pool, alternating, with torch's threads as given;
it prints the median milliseconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

from bench.whisper_gpu import POOL
from services.whisper.api import detection_window


def padded_as_transcribe(samples: np.ndarray, n_mels: int) -> torch.Tensor:
    """The service's window before: transcribe's padding, then its first 3,000 frames."""
    return pad_or_trim(log_mel_spectrogram(samples, n_mels, padding=N_SAMPLES), N_FRAMES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speech", type=Path, default=Path(".speech"))
    parser.add_argument("--n-mels", type=int, default=128, help="large-v3's")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool, _ = soundfile.read(args.speech / POOL, dtype="float32")
    slices = [pool[start : start + N_SAMPLES] for start in range(0, len(pool) - N_SAMPLES, N_SAMPLES)]

    forms = {"30 s of zeros (transcribe)": padded_as_transcribe, "detection_window": detection_window}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for i in range(args.repeats + 2):  # the first two warm up
        samples = slices[i % len(slices)]
        for name, form in forms.items():
            started = time.perf_counter()
            form(samples, args.n_mels)
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name}: {ms:.1f} ms (median of {args.repeats}, {args.threads} thread(s))")
    print(f"ratio: {medians['30 s of zeros (transcribe)'] / medians['detection_window']:.2f}x")


if __name__ == "__main__":
    main()
