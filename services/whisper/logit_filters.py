"""openai-whisper's logit filters, computed for the whole batch on the device.

Why: ``whisper.decoding.ApplyTimestampRules`` walks the batch row by row, copying each row's
tokens to the host (``.tolist()``) and comparing a logsumexp with a maximum in Python: at a
batch of 16 that is dozens of device-to-host waits per decoded token, and with the decoder
step replayed as one CUDA graph (``services.whisper.static_decoder``) those waits are most
of a step. ``SuppressTokens`` builds its index from a Python list on every step. The rules
here are the same, as masks over the batch: no host wait, the same logits to the bit
(``tests/unit/whisper/test_static_decoding.py`` checks that against the package's filters).
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


def apply_timestamp_rules(
    logits: torch.Tensor,
    history: torch.Tensor,
    sample_begin: torch.Tensor,
    length: torch.Tensor,
    max_initial: torch.Tensor,
    applies: torch.Tensor,
    tokenizer: Tokenizer,
) -> None:
    """openai-whisper's timestamp rules on ``logits`` (rows x vocabulary), in place, each row with its own history.

    Row ``r`` has sampled ``history[r, sample_begin[r]:length[r]]`` so far (what lies past ``length``
    is never read), may start with a timestamp of index at most ``max_initial[r]`` (-1: any), and
    follows the rules only where ``applies[r]`` (rows decoded without timestamps do not).

    The package's rules, per row: timestamps come in pairs (after two timestamps only text or
    end of text; after one timestamp that follows text, only a timestamp or end of text);
    timestamps never decrease, and a segment is never empty; the first sampled token is a
    timestamp, at most ``max_initial``; and where the timestamps together are likelier than
    any one text token, the next token is a timestamp.
    """
    begin, eot = tokenizer.timestamp_begin, tokenizer.eot
    columns = torch.arange(logits.shape[1], device=logits.device)
    positions = torch.arange(history.shape[1], device=logits.device)
    is_timestamp_column, is_text = columns >= begin, columns < eot  # end of text and specials are neither
    count = length - sample_begin  # tokens sampled so far

    def at(index: torch.Tensor) -> torch.Tensor:
        return history.gather(1, index.clamp(min=0)[:, None])[:, 0]

    last_was = (count >= 1) & (at(length - 1) >= begin)
    penultimate_was = (count < 2) | (at(length - 2) >= begin)  # the package's rule for short histories
    # after a pair of timestamps: no timestamp; after text then a timestamp: no text
    mask = (last_was & penultimate_was)[:, None] & is_timestamp_column
    mask |= (last_was & ~penultimate_was)[:, None] & is_text
    # the last timestamp sampled (by position), where a row has one: it may repeat only to close the
    # segment it opened; otherwise the next one is strictly later
    sampled = (positions >= sample_begin[:, None]) & (positions < length[:, None])
    last_index = torch.where(sampled & (history >= begin), positions, -1).amax(dim=1)
    last = at(last_index)
    upper = torch.where(last_was & ~penultimate_was, last, last + 1)
    mask |= (last_index >= 0)[:, None] & is_timestamp_column & (columns < upper[:, None])
    # the first sampled token is a timestamp, no later than max_initial
    first = count == 0
    mask |= first[:, None] & ~is_timestamp_column
    mask |= (first & (max_initial >= 0))[:, None] & (columns > begin + max_initial[:, None])
    if tokenizer.no_timestamps is not None:
        mask[:, tokenizer.no_timestamps] = True
    logits.masked_fill_(mask & applies[:, None], -torch.inf)

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
    max_text_logprob = logprobs[:, :begin].amax(dim=-1)
    likelier = (timestamp_logprob > max_text_logprob) & applies
    logits.masked_fill_(likelier[:, None] & ~is_timestamp_column, -torch.inf)


class BatchedTimestampRules(LogitFilter):
    """``whisper.decoding.ApplyTimestampRules``, every row at once (``apply_timestamp_rules``)."""

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, max_initial_timestamp_index: int | None) -> None:
        self.tokenizer, self.sample_begin = tokenizer, sample_begin
        self.max_initial = -1 if max_initial_timestamp_index is None else max_initial_timestamp_index

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        rows, device = tokens.shape[0], tokens.device

        def each(value: int | bool) -> torch.Tensor:
            return torch.full((rows,), value, device=device)

        apply_timestamp_rules(
            logits, tokens, each(self.sample_begin), each(tokens.shape[1]), each(self.max_initial), each(True),
            self.tokenizer,
        )  # fmt: skip
