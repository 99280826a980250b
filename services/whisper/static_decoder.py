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
from torch.nn.functional import layer_norm, linear, scaled_dot_product_attention
from whisper.decoding import Inference
from whisper.model import ModelDimensions, Whisper

# Windows prefilled at once, at most (services/whisper/decode_engine.py): a prefill's scratch holds each
# window's cross-attention keys and values (245 MB at large-v3) beside the shared cache, so 128 windows
# admitted together needed a second 41 GB and did not fit an 80 GB GPU; the encoder is as fast a window
# at 16 windows a pass (6.9 ms on an H200, 6.6 ms at 64).
PREFILL_ROWS = 16


def captured_sizes(capacity: int, step: int = 16) -> list[int]:
    """Batch sizes a step is captured at: powers of two below ``step``, then every ``step`` rows.

    Why this fine: a step reads the cross-attention keys and values of every row of its size,
    padding rows' too (245 MB a window at large-v3), and that reading is most of a step's time
    on an H200. With powers of two only, 65 windows would run at 128 rows; every 16 rows
    wastes at most 15."""
    sizes = {1 << i for i in range(step.bit_length()) if 1 << i < min(step, capacity)}
    return sorted(sizes | set(range(step, capacity, step)) | {capacity})


class DecoderCache:
    """Keys and values of every decoder layer for up to ``rows`` windows, at ``text_positions`` text
    positions (all ``n_text_ctx`` by default; a prefill's scratch needs only its prompt's)."""

    def __init__(
        self,
        dims: ModelDimensions,
        rows: int,
        dtype: torch.dtype,
        device: torch.device,
        text_positions: int | None = None,
    ) -> None:
        def layers(length: int) -> list[torch.Tensor]:
            return [
                torch.zeros(rows, length, dims.n_text_state, dtype=dtype, device=device)
                for _ in range(dims.n_text_layer)
            ]

        self.rows, self.dtype = rows, dtype
        text = text_positions or dims.n_text_ctx
        self.self_keys, self.self_values = layers(text), layers(text)
        self.cross_keys, self.cross_values = layers(dims.n_audio_ctx), layers(dims.n_audio_ctx)


def _check_room(dims: ModelDimensions, rows: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, with the reason, a cache the GPU cannot hold, rather than fail on an allocation deep in
    start-up: each row keeps keys and values of every text position and audio frame (318 MB at large-v3
    in fp16; 128 rows, 41 GB), and a prefill's scratch holds up to PREFILL_ROWS windows' more."""
    if device.type != "cuda":
        return
    per_row = 2 * dims.n_text_layer * (dims.n_text_ctx + dims.n_audio_ctx) * dims.n_text_state * dtype.itemsize
    needed = (rows + min(rows, PREFILL_ROWS)) * per_row
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free:
        raise RuntimeError(
            f"a Whisper decoder cache of {rows} windows (MULTIMODAL_WHISPER_MAX_BATCH_SIZE) and its prefill "
            f"need {needed / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of the GPU is free; "
            f"at {per_row / 2**20:.0f} MiB a window, lower it"
        )


class _StepGraph:
    """One decoder step for ``rows`` rows at one shared position, captured: fixed input and output buffers."""

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
        _check_room(self.dims, capacity, dtype, self.device)
        self.cache = DecoderCache(self.dims, capacity, dtype, self.device)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self._graphs: dict[int, _StepGraph] = {}
        self._row_index = torch.arange(capacity, device=self.device)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.sizes = captured_sizes(capacity)
        self._fuse_kernels()

    @torch.no_grad()
    def _fuse_kernels(self) -> None:
        """Fewer kernels a step, where the result is the same to the bit on this device.

        A step at large-v3 shapes launches several hundred kernels, which bounds it more than the
        GPU's arithmetic. openai-whisper's LayerNorm casts to fp32 and back around the norm (three
        kernels, where ``layer_norm`` on the fp16 input with fp32 parameters is one), and its
        query, key and value are three matrix products where one over the stacked weights does.
        Each is used only if it gives exactly openai-whisper's numbers on a sample here, so the
        tokens stay the package's.
        """
        block = self.model.decoder.blocks[0]
        sample = torch.randn(4, 3, self.dims.n_text_state, device=self.device).to(self.dtype)
        norm = block.attn_ln
        try:
            fused_norm = layer_norm(sample, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            self.fused_norm = torch.equal(fused_norm, norm(sample))
        except RuntimeError:  # fp16 input with fp32 parameters: not every torch build takes it
            self.fused_norm = False
        self._qkv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in self.model.decoder.blocks:
            attn = block.attn
            bias = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias])
            weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
            self._qkv.append((weight.to(self.dtype), bias.to(self.dtype)))
        fused_qkv = linear(sample, *self._qkv[0]).split(self.dims.n_text_state, dim=-1)
        attn = self.model.decoder.blocks[0].attn
        separate = (attn.query(sample), attn.key(sample), attn.value(sample))
        if not all(torch.equal(a, b) for a, b in zip(fused_qkv, separate, strict=True)):
            self._qkv = []  # three products, as openai-whisper does them

    def _norm(self, module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if self.fused_norm:
            return layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
        return module(x)

    def _query_key_value(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._qkv:
            return tuple(linear(h, *self._qkv[layer]).split(self.dims.n_text_state, dim=-1))
        attn = self.model.decoder.blocks[layer].attn
        return attn.query(h), attn.key(h), attn.value(h)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every batch size's step now, so that no request pays for it (nothing may be decoding)."""
        if self.use_graphs:
            for rows in self.sizes:
                self._graph(rows)

    def _graph(self, rows: int) -> _StepGraph:
        size = self.size_for(rows)
        if size not in self._graphs:
            self._graphs[size] = _StepGraph(self, self.cache, size, self.pool)
        return self._graphs[size]

    def size_for(self, rows: int) -> int:
        """The batch size a step of ``rows`` rows runs at: the next captured one."""
        return next(size for size in self.sizes if size >= rows)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(*x.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)

        a = scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return a.permute(0, 2, 1, 3).flatten(start_dim=2)

    def forward(
        self,
        cache: DecoderCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int | None = None,
        per_row: bool = False,
    ) -> torch.Tensor:
        """Logits of ``tokens`` at ``positions``, writing their keys and values into ``cache``.

        ``tokens`` is rows x n at the n ``positions`` every row shares, or (``per_row``) rows x 1,
        row r's one token at ``positions[r]``. Self-attention reads the first ``length`` positions
        of the cache, all of them by default (a graph's step, whose position changes from replay
        to replay); an eager call that knows its position reads no further, as openai-whisper's
        growing cache does.
        """
        decoder, rows = self.model.decoder, tokens.shape[0]
        length = length or self.dims.n_text_ctx
        embedded = decoder.positional_embedding[positions]
        x = (decoder.token_embedding(tokens) + (embedded[:, None] if per_row else embedded)).to(cache.dtype)
        # causal, as an additive mask made once a step (a boolean one is converted in every layer)
        hidden = self.key_positions[None, :length] > positions[:, None]
        if per_row:
            hidden = hidden[:, None, None, :]  # rows x heads x queries x keys
        mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill_(hidden, -torch.inf)
        for layer, block in enumerate(decoder.blocks):
            query, key, value = self._query_key_value(layer, self._norm(block.attn_ln, x))
            keys, values = cache.self_keys[layer][:rows, :length], cache.self_values[layer][:rows, :length]
            if per_row:
                keys.index_put_((self._row_index[:rows], positions), key[:, 0])
                values.index_put_((self._row_index[:rows], positions), value[:, 0])
            else:
                keys.index_copy_(1, positions, key)
                values.index_copy_(1, positions, value)
            x = x + block.attn.out(self._attend(query, keys, values, mask))
            h = self._norm(block.cross_attn_ln, x)
            cross = self._attend(
                block.cross_attn.query(h), cache.cross_keys[layer][:rows], cache.cross_values[layer][:rows], None
            )
            x = x + block.cross_attn.out(cross)
            x = x + block.mlp(self._norm(block.mlp_ln, x))
        x = self._norm(decoder.ln, x)
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

    def place(self, source: DecoderCache, rows: torch.Tensor, length: int) -> None:
        """Copy ``source``'s rows (their first ``length`` text positions) into the shared cache at ``rows``."""
        cache = self.cache
        for layer in range(self.dims.n_text_layer):
            count = len(rows)
            cache.cross_keys[layer].index_copy_(0, rows, source.cross_keys[layer][:count])
            cache.cross_values[layer].index_copy_(0, rows, source.cross_values[layer][:count])
            cache.self_keys[layer][:, :length].index_copy_(0, rows, source.self_keys[layer][:count, :length])
            cache.self_values[layer][:, :length].index_copy_(0, rows, source.self_values[layer][:count, :length])

    def cache_for(self, rows: int, dtype: torch.dtype) -> DecoderCache:
        if rows <= self.cache.rows and dtype == self.dtype:
            return self.cache
        return DecoderCache(self.dims, rows, dtype, self.device)


class StaticCacheInference(Inference):
    """openai-whisper's ``Inference`` for one ``DecodingTask.run``, over a ``StaticDecoder``.

    Greedy and sampled decoding only: beam search, the one caller of ``rearrange_kv_cache``,
    keeps the package's own inference (``services.whisper.decoding``).
    """

    def __init__(self, decoder: StaticDecoder) -> None:
        self.decoder = decoder
        self.cache: DecoderCache | None = None

    def logits(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # the first pass: every initial token
            self.cache = self.decoder.cache_for(tokens.shape[0], audio_features.dtype)
            return self.decoder.prefill(self.cache, tokens, audio_features)
        return self.decoder.step(self.cache, tokens[:, -1:], tokens.shape[-1] - 1)

    def cleanup_caching(self) -> None:
        self.cache = None  # the buffers stay with the decoder for the next task
