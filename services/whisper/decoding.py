"""openai-whisper's decoding task with a language per row of the batch: how the Whisper service
decodes windows of different languages in one pass. torch and openai-whisper only (no BentoML),
so that ``bench/whisper_gpu_decode.py`` measures this very code on a GPU machine.
"""

from __future__ import annotations

from typing import Any

import torch
from whisper.decoding import DecodingOptions, DecodingTask


class MixedLanguageTask(DecodingTask):
    """``DecodingTask.run`` already writes one language token per row (at ``sot_index + 1``)
    when it detects languages itself; this writes the given ones instead. Nothing else in the
    task depends on the language: suppressed tokens, timestamp rules and text decoding are
    the same for every language of a multilingual tokenizer.
    """

    def __init__(self, model: Any, options: DecodingOptions, languages: list[str]) -> None:
        super().__init__(model, options)
        self.languages = languages
        self.language_tokens = torch.tensor([self.tokenizer.to_language_token(language) for language in languages])

    def _detect_language(self, audio_features: torch.Tensor, tokens: torch.Tensor) -> tuple[list[str], None]:
        tokens[:, self.sot_index + 1] = self.language_tokens
        return self.languages, None
