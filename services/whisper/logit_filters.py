"""openai-whisper's logit filters, computed for the whole batch on the device.

Why: ``whisper.decoding.ApplyTimestampRules`` walks the batch row by row, copying each row's
tokens to the host (``.tolist()``) and comparing a logsumexp with a maximum in Python: at a
batch of 16 that is dozens of device-to-host waits per decoded token, and with the decoder
step replayed as one CUDA graph (``services.whisper.static_decoder``) those waits are most
of a step. ``SuppressTokens`` builds its index from a Python list on every step. The rules
here are the same, as masks over the batch: no host wait, the same logits to the bit
(``tests/unit/whisper/test_logit_filters.py`` checks that against the package's filters).
"""

from __future__ import annotations

import torch
from whisper.decoding import LogitFilter
from whisper.tokenizer import Tokenizer


class SuppressTokensOnDevice(LogitFilter):
    """``whisper.decoding.SuppressTokens`` with its token index built once, on the logits' device."""

    def __init__(self, suppress_tokens: list[int], device: torch.device) -> None:
        self.index = torch.tensor(sorted(set(suppress_tokens)), dtype=torch.long, device=device)

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        logits.index_fill_(1, self.index, -torch.inf)


class BatchedTimestampRules(LogitFilter):
    """``whisper.decoding.ApplyTimestampRules``, every row at once.

    The package's rules, per row: timestamps come in pairs (after two timestamps only text or
    end of text; after one timestamp that follows text, only a timestamp or end of text);
    timestamps never decrease, and a segment is never empty; the first sampled token is a
    timestamp, at most ``max_initial_timestamp_index``; and where the timestamps together
    are likelier than any one text token, the next token is a timestamp.
    """

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, max_initial_timestamp_index: int | None) -> None:
        self.no_timestamps = tokenizer.no_timestamps
        self.eot, self.timestamp_begin = tokenizer.eot, tokenizer.timestamp_begin
        self.sample_begin = sample_begin
        self.max_initial_timestamp_index = max_initial_timestamp_index
        self._columns: torch.Tensor | None = None

    def _vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        if self._columns is None or self._columns.device != logits.device or len(self._columns) != logits.shape[1]:
            self._columns = torch.arange(logits.shape[1], device=logits.device)
        return self._columns

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        begin, columns = self.timestamp_begin, self._vocabulary(logits)
        if self.no_timestamps is not None:
            logits[:, self.no_timestamps] = -torch.inf

        sampled = tokens[:, self.sample_begin :]
        is_timestamp = sampled >= begin  # rows x sampled tokens
        length = sampled.shape[1]
        rows = logits.shape[0]
        no, yes = (torch.full((rows,), value, device=logits.device) for value in (False, True))
        last_was = is_timestamp[:, -1] if length >= 1 else no
        penultimate_was = is_timestamp[:, -2] if length >= 2 else yes  # the package's rule for short histories
        is_text = columns < self.eot  # end of text and the special tokens are neither
        is_timestamp_column = columns >= begin
        # after a pair of timestamps: no timestamp; after text then a timestamp: no text
        mask = (last_was & penultimate_was)[:, None] & is_timestamp_column
        mask |= (last_was & ~penultimate_was)[:, None] & is_text

        if length >= 1:
            # the last timestamp sampled (by position), where a row has one
            positions = torch.arange(length, device=logits.device)
            last_index = torch.where(is_timestamp, positions, -1).amax(dim=1)
            has_timestamp = last_index >= 0
            last = sampled.gather(1, last_index.clamp(min=0)[:, None])[:, 0]
            # it may repeat only to close the segment it opened; otherwise strictly later
            upper = torch.where(last_was & ~penultimate_was, last, last + 1)
            mask |= has_timestamp[:, None] & is_timestamp_column & (columns < upper[:, None])
        logits.masked_fill_(mask, -torch.inf)

        if tokens.shape[1] == self.sample_begin:
            logits[:, :begin] = -torch.inf  # the first sampled token is a timestamp
            if self.max_initial_timestamp_index is not None:
                logits[:, begin + self.max_initial_timestamp_index + 1 :] = -torch.inf

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
        max_text_logprob = logprobs[:, :begin].amax(dim=-1)
        logits.masked_fill_((timestamp_logprob > max_text_logprob)[:, None] & (columns < begin), -torch.inf)
