"""CLIP's text tokenisation for a batch, straight from the Rust tokenizer.

What ``CLIPProcessor(text=..., padding=True, truncation=True)`` gives (token ids padded to the
batch's longest text, an attention mask, texts truncated to the model's length), without the Python
around it: transformers' wrapper copies every id through nested Python lists, about 40% of the time
of a batch, and holds the GIL throughout. Here the Rust tokenizer encodes chunks of a large batch on
a few threads at once (it releases the GIL) and the ids are padded in NumPy. On an H200 host,
requests of 64 texts reached 16% of the raw text model with the processor, its thread busy 77% of
the time (bench/RESULTS.md, run 15). The unit test holds it to the processor's output.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from transformers import PreTrainedTokenizerBase


class BatchTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, threads: int = 4, chunk: int = 64) -> None:
        # A copy: padding and truncation are settings of the Rust object, and transformers sets its own per call.
        self._rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._rust.no_padding()
        self._rust.enable_truncation(max_length)
        self.pad_token_id: int = tokenizer.pad_token_id
        self.chunk = chunk
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="clip-tokenize")

    def _encode(self, texts: list[str]) -> list[Encoding]:
        return self._rust.encode_batch_fast(texts)  # no character offsets: CLIP needs ids only

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, each (len(texts), the longest text's length), int64."""
        chunks = [texts[i : i + self.chunk] for i in range(0, len(texts), self.chunk)]
        encoded = self._pool.map(self._encode, chunks) if len(chunks) > 1 else [self._encode(texts)]
        sequences = [encoding.ids for part in encoded for encoding in part]
        length = max(map(len, sequences), default=0)
        ids = np.full((len(sequences), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)
