"""openai-whisper's decoding task as the Whisper service runs it on a batch of windows.

Two changes to ``whisper.decoding.DecodingTask``, neither of which changes a token:
- a language per row, so that windows in different languages share one pass;
- on a ``StaticDecoder`` (``services.whisper.static_decoder``), the step loop without host
  waits: keys and values in fixed buffers, each step one CUDA graph, the logit filters and
  the greedy choice as batch-wide tensor operations (``services.whisper.logit_filters``).

torch and openai-whisper only (no BentoML), so that ``bench/whisper_gpu.py`` measures this
very code on a GPU machine.
"""

from __future__ import annotations

from typing import Any

import torch
from whisper.decoding import (
    ApplyTimestampRules,
    DecodingOptions,
    DecodingTask,
    GreedyDecoder,
    LogitFilter,
    SuppressTokens,
)

from services.whisper.logit_filters import BatchedTimestampRules, SuppressTokensOnDevice
from services.whisper.static_decoder import StaticCacheInference, StaticDecoder


class GreedyDecoderOnDevice(GreedyDecoder):
    """``whisper.decoding.GreedyDecoder`` without host waits, but one every ``check_every`` steps.

    The package indexes by a boolean mask (a wait for its count) and asks after every token
    whether all rows have ended (another). Here finished rows are kept at end of text by a
    ``where``, and the question is asked every few steps: a batch that ended meanwhile
    decodes a few more end-of-text tokens, which the task cuts off as it always does.
    """

    def __init__(self, temperature: float, eot: int, check_every: int = 4) -> None:
        super().__init__(temperature, eot)
        self.check_every, self._steps = check_every, 0

    def reset(self) -> None:
        self._steps = 0

    def update(
        self, tokens: torch.Tensor, logits: torch.Tensor, sum_logprobs: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        if self.temperature == 0:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = torch.distributions.Categorical(logits=logits / self.temperature).sample()
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        current_logprobs = logprobs.gather(1, next_tokens[:, None])[:, 0]
        finished = tokens[:, -1] == self.eot
        sum_logprobs += current_logprobs * ~finished
        next_tokens = torch.where(finished, self.eot, next_tokens)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        self._steps += 1
        completed = self._steps % self.check_every == 0 and bool((next_tokens == self.eot).all())
        return tokens, completed


class BatchDecodingTask(DecodingTask):
    """``DecodingTask`` over a batch of windows, with ``languages`` (one per row) if given, and
    ``static_decoder`` if given (greedy or sampled decoding; beam search and best-of keep the
    package's loop).

    ``DecodingTask.run`` already writes one language token per row (at ``sot_index + 1``)
    when it detects languages itself; given languages are written there instead. Nothing else
    in the task depends on the language: suppressed tokens, timestamp rules and text decoding
    are the same for every language of a multilingual tokenizer.
    """

    def __init__(
        self,
        model: Any,
        options: DecodingOptions,
        languages: list[str] | None = None,
        static_decoder: StaticDecoder | None = None,
    ) -> None:
        super().__init__(model, options)
        self.languages = languages
        if languages is not None:
            self.language_tokens = torch.tensor([self.tokenizer.to_language_token(lang) for lang in languages])
        if static_decoder is not None and options.beam_size is None and self.n_group == 1:
            self.inference = StaticCacheInference(static_decoder)
            self.decoder = GreedyDecoderOnDevice(options.temperature, self.tokenizer.eot)
            filters: list[LogitFilter] = self.logit_filters  # type: ignore[has-type]
            self.logit_filters = [self._on_device(f, static_decoder.device) for f in filters]

    @staticmethod
    def _on_device(logit_filter: LogitFilter, device: torch.device) -> LogitFilter:
        if isinstance(logit_filter, ApplyTimestampRules):
            return BatchedTimestampRules(
                logit_filter.tokenizer, logit_filter.sample_begin, logit_filter.max_initial_timestamp_index
            )
        if isinstance(logit_filter, SuppressTokens):
            return SuppressTokensOnDevice(logit_filter.suppress_tokens, device)
        return logit_filter  # SuppressBlank acts on the first step only

    def _detect_language(self, audio_features: torch.Tensor, tokens: torch.Tensor) -> tuple[list[str], Any]:
        if self.languages is None:
            return super()._detect_language(audio_features, tokens)
        tokens[:, self.sot_index + 1] = self.language_tokens
        return self.languages, None
