"""The tiny multilingual Whisper (bentos.tiny.whisper) for the Whisper unit tests, and windows to decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper

from bentos.tiny.whisper import CHECKPOINT, generate


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> whisper.Whisper:
    folder = tmp_path_factory.mktemp("whisper")
    generate(folder, seed=0)
    return whisper.load_model(str(folder / CHECKPOINT), device="cpu").eval()


def chirp_mels(model: whisper.Whisper, count: int) -> torch.Tensor:
    """Log-mels of ``count`` different seconds-long sounds (chirps in noise), padded to 30 s."""
    rng = np.random.default_rng(7)
    windows = []
    for i in range(count):
        seconds = 2 + 3 * i
        t = np.arange(16_000 * seconds) / 16_000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)
        audio = whisper.pad_or_trim(torch.from_numpy(audio.astype(np.float32)))
        windows.append(whisper.log_mel_spectrogram(audio, model.dims.n_mels))
    return torch.stack(windows)
