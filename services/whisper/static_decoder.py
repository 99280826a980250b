"""Whisper's text decoder over a static KV cache, each step replayed as a CUDA graph.

Why: openai-whisper's decoding loop runs the 32-layer decoder once per token, and its cache
grows by ``torch.cat`` on every step. At large-v3 shapes a step is about 300 small kernels:
launching them costs more than the GPU's work (16-29 ms a step from batch 1 to 16 on an
H200, the GPU busy 12-19% of the time). Here the keys and values live in buffers of fixed
size, written in place at the step's position, so one step always launches the same
kernels on the same memory: captured once per batch size as a CUDA graph, a step is one
launch.

The arithmetic is openai-whisper's own, module by module (its LayerNorm, Linear and SDPA
attention, the same weights): only where keys and values are kept differs. In a graph,
self-attention reads all ``n_text_ctx`` cached positions with a mask for those not yet
written, rather than a cache cut to the current length; masked positions weigh exactly zero
(on the CPU, with no graphs, it reads only the written ones). Rows of a
batch never interact, so a batch padded up to a captured size gives each real row the
logits it gets alone.

torch and openai-whisper only (no BentoML), so ``bench/whisper_gpu.py`` measures this code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from whisper.decoding import Inference
from whisper.model import ModelDimensions, Whisper


class DecoderCache:
    """Keys and values of every decoder layer for up to ``rows`` windows."""

    def __init__(self, dims: ModelDimensions, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        def layers(length: int) -> list[torch.Tensor]:
            return [
                torch.zeros(rows, length, dims.n_text_state, dtype=dtype, device=device)
                for _ in range(dims.n_text_layer)
            ]

        self.rows, self.dtype = rows, dtype
        self.self_keys, self.self_values = layers(dims.n_text_ctx), layers(dims.n_text_ctx)
        self.cross_keys, self.cross_values = layers(dims.n_audio_ctx), layers(dims.n_audio_ctx)

    def reorder(self, rows: int, source: torch.Tensor) -> None:
        """Row i of the text cache becomes row ``source[i]`` (beam search keeps its best beams)."""
        for cache in (*self.self_keys, *self.self_values):
            cache[:rows] = cache[:rows].index_select(0, source)


class _StepGraph:
    """One decoder step for ``rows`` rows, captured: fixed input and output buffers."""

    def __init__(self, decoder: StaticDecoder, cache: DecoderCache, rows: int, pool: Any) -> None:
        device = decoder.key_positions.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graph requires
            for _ in range(2):
                decoder.forward(cache, self.tokens, self.position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = decoder.forward(cache, self.tokens, self.position)

    def run(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        rows = tokens.shape[0]
        self.tokens[:rows].copy_(tokens)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits[:rows]  # rows past the batch are padding: stale, finite, never read


class StaticDecoder:
    """The text decoder of ``model`` over a cache of ``capacity`` rows, its step graphed on a GPU.

    One decode at a time: the cache is shared (the Whisper service decodes under its lock).
    Batches of more than ``capacity`` rows run eagerly over a cache of their own size.
    """

    def __init__(self, model: Whisper, capacity: int, dtype: torch.dtype, use_graphs: bool) -> None:
        self.model, self.dims, self.dtype = model, model.dims, dtype
        self.device = model.decoder.token_embedding.weight.device
        self.n_head = self.dims.n_text_head
        self.key_positions = torch.arange(self.dims.n_text_ctx, device=self.device)
        self.cache = DecoderCache(self.dims, capacity, dtype, self.device)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self._graphs: dict[int, _StepGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.sizes = sorted({min(2**i, capacity) for i in range(capacity.bit_length() + 1)})

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every batch size's step now, so that no request pays for it (nothing may be decoding)."""
        if self.use_graphs:
            for rows in self.sizes:
                self._graph(rows)

    def _graph(self, rows: int) -> _StepGraph:
        size = next(size for size in self.sizes if size >= rows)
        if size not in self._graphs:
            self._graphs[size] = _StepGraph(self, self.cache, size, self._pool)
        return self._graphs[size]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(*x.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)

        a = scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return a.permute(0, 2, 1, 3).flatten(start_dim=2)

    def forward(
        self, cache: DecoderCache, tokens: torch.Tensor, positions: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """Logits of ``tokens`` at ``positions``, writing their keys and values into ``cache``.

        Self-attention reads the first ``length`` positions of the cache, all of them by default
        (a graph's step, whose position changes from replay to replay); an eager call that
        knows its position reads no further, as openai-whisper's growing cache does.
        """
        decoder, rows = self.model.decoder, tokens.shape[0]
        length = length or self.dims.n_text_ctx
        x = (decoder.token_embedding(tokens) + decoder.positional_embedding[positions]).to(cache.dtype)
        visible = self.key_positions[None, :length] <= positions[:, None]  # causal
        for layer, block in enumerate(decoder.blocks):
            h = block.attn_ln(x)
            keys, values = cache.self_keys[layer][:rows, :length], cache.self_values[layer][:rows, :length]
            keys.index_copy_(1, positions, block.attn.key(h))
            values.index_copy_(1, positions, block.attn.value(h))
            x = x + block.attn.out(self._attend(block.attn.query(h), keys, values, visible))
            h = block.cross_attn_ln(x)
            cross = self._attend(
                block.cross_attn.query(h), cache.cross_keys[layer][:rows], cache.cross_values[layer][:rows], None
            )
            x = x + block.cross_attn.out(cross)
            x = x + block.mlp(block.mlp_ln(x))
        x = decoder.ln(x)
        return (x @ torch.transpose(decoder.token_embedding.weight.to(x.dtype), 0, 1)).float()

    def prefill(self, cache: DecoderCache, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        """The first pass: cross-attention keys and values from the audio, then the initial tokens."""
        rows = tokens.shape[0]
        for layer, block in enumerate(self.model.decoder.blocks):
            cache.cross_keys[layer][:rows].copy_(block.cross_attn.key(audio_features))
            cache.cross_values[layer][:rows].copy_(block.cross_attn.value(audio_features))
        length = tokens.shape[1]
        return self.forward(cache, tokens, torch.arange(length, device=tokens.device), length)

    def step(self, cache: DecoderCache, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits of one new token per row (``tokens`` is rows x 1) at ``position``."""
        if self.use_graphs and cache is self.cache:
            return self._graph(tokens.shape[0]).run(tokens, position)
        return self.forward(cache, tokens, torch.tensor([position], device=tokens.device), position + 1)

    def cache_for(self, rows: int, dtype: torch.dtype) -> DecoderCache:
        if rows <= self.cache.rows and dtype == self.dtype:
            return self.cache
        return DecoderCache(self.dims, rows, dtype, self.device)


class StaticCacheInference(Inference):
    """openai-whisper's ``Inference`` for one ``DecodingTask.run``, over a ``StaticDecoder``."""

    def __init__(self, decoder: StaticDecoder, initial_token_length: int) -> None:
        self.decoder, self.initial_token_length = decoder, initial_token_length
        self.cache: DecoderCache | None = None

    def logits(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # the first pass: every initial token
            self.cache = self.decoder.cache_for(tokens.shape[0], audio_features.dtype)
            return self.decoder.prefill(self.cache, tokens, audio_features)
        return self.decoder.step(self.cache, tokens[:, -1:], tokens.shape[-1] - 1)

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        if self.cache is not None and source_indices != list(range(len(source_indices))):
            source = torch.tensor(source_indices, device=self.decoder.device)
            self.cache.reorder(len(source_indices), source)

    def cleanup_caching(self) -> None:
        self.cache = None  # the buffers stay with the decoder for the next task
