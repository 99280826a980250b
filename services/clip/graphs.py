"""CLIP's towers on fixed batch shapes, replayed as CUDA graphs on a GPU.

Why: a ViT-L/14 forward is about 400 kernel launches. Launched op by op from Python they cost
milliseconds of CPU per batch, and every op releases and retakes the GIL, so under load the
encoder thread queues behind the worker's event loop at each of them (text batches took 40-58 ms
in the service against 5-7 ms raw, bench/RESULTS.md). A CUDA graph launches the whole forward in
one call, and the thread is free to decode the next images while the GPU runs.

A graph has fixed shapes, so batches are padded up to the next captured size (powers of two up
to the largest batch) and the padding rows are dropped. Texts are also padded to a captured
length, with the tokenizer's pad token and a zero attention mask: exactly what ``padding=True``
does for the shorter texts of any batch, so a text's embedding does not depend on it (CLIP's
text tower is causal and pools at the end-of-text token).

The image tower is captured as a chain of graphs, a few transformer layers each, and at most two
of them are queued on the GPU at a time. Why: on an H200 nvJPEG's work waits for whatever the GPU
has queued before it, whatever the stream: beside a batch of 64 queued whole (29 ms), decoding the
next 64 photographs took 58 ms instead of 7, so preparation, not the model, set the pace; beside
chunks of 16 queued one at a time, 17 ms (bench/clip_overlap.py; bench/RESULTS.md, runs 15-17). Cutting
the batch into chunks would cost the model 8% at batch 16; cutting the layers costs it nothing but
one launch per segment.

``capture=False`` runs the same padded buffers eagerly: the tests check the padding on a CPU,
where graphs do not exist; the service on a CPU does not pad at all.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from itertools import product

import torch

Forward = Callable[..., torch.Tensor]


def batch_sizes(largest: int) -> list[int]:
    """Powers of two below ``largest``, then ``largest``: padding wastes at most half a batch."""
    sizes = [1 << i for i in range(largest.bit_length()) if 1 << i < largest]
    return [*sizes, largest]


def text_lengths(max_length: int, step: int = 8) -> list[int]:
    """Token lengths the text tower is captured at: every ``step``, then the model's maximum.

    Why this fine: the tower's cost grows with the padded length, and a batch runs at the first
    captured length that fits its longest text. With lengths 16, 32 and 64 only, the benchmark's
    batches (longest text 37 to 40 tokens) ran at 64, and 64-text requests reached 49% of the raw
    text model, which pads to the longest text (bench/RESULTS.md, run 19). A step of 8 wastes at
    most 7 tokens a row."""
    return sorted({*range(step, max_length, step), max_length})


def smallest_fitting(sizes: Sequence[int], n: int) -> int:
    return min(size for size in sizes if size >= n)


def _warm_up(forward: Callable[[], object], times: int) -> None:
    """torch's recipe before a capture: run on a side stream (lazy initialisation, cuBLAS workspaces)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            forward()
    torch.cuda.current_stream().wait_stream(side)


class _Shape:
    """Static input buffers of one shape and, when captured, the graph that reads them."""

    def __init__(
        self, forward: Forward, inputs: dict[str, torch.Tensor], capture: bool, pool, warmups: int = 2
    ) -> None:
        self.forward, self.inputs, self.graph = forward, inputs, None
        if not capture:
            return
        _warm_up(lambda: forward(**inputs), warmups)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(**inputs)

    def run(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of the forward over the buffers, as a tensor of its own.

        A copy, because graphs of one tower share a memory pool: the next replay may overwrite
        this output."""
        if self.graph is None:
            return self.forward(**self.inputs)[:rows]
        self.graph.replay()
        return self.output[:rows].clone()


class _Chain:
    """A static input buffer of one batch size and the forward's segments, each captured as a graph
    that reads the output of the one before."""

    def __init__(
        self, segments: Sequence[Forward], inputs: torch.Tensor, capture: bool, pool, warmups: int = 2
    ) -> None:
        self.segments, self.inputs = segments, inputs
        self.graphs: list[torch.cuda.CUDAGraph] = []
        if not capture:
            return
        _warm_up(self._eager, warmups)
        hidden = inputs
        for segment in segments:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = segment(hidden)
            self.graphs.append(graph)
        self.output = hidden

    def _eager(self) -> torch.Tensor:
        hidden = self.inputs
        for segment in self.segments:
            hidden = segment(hidden)
        return hidden

    def run(self, rows: int, queued: int) -> torch.Tensor:
        """The first ``rows`` rows of the forward over the buffer, as a tensor of its own (the next
        replay may overwrite the graphs' output); at most ``queued`` segments on the GPU at a time."""
        if not self.graphs:
            return self._eager()[:rows]
        in_flight: deque[torch.cuda.Event] = deque()
        for graph in self.graphs:
            if len(in_flight) == queued:
                in_flight.popleft().synchronize()
            graph.replay()
            done = torch.cuda.Event()
            done.record()
            in_flight.append(done)
        return self.output[:rows].clone()


class GraphedImageTower:
    """The image tower, ``segments`` applied in turn to ``pixel_values``, on batches padded to captured sizes."""

    def __init__(
        self,
        segments: Sequence[Forward],
        image_size: int,
        largest_batch: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool,
        queued: int = 2,
    ) -> None:
        self.sizes = batch_sizes(largest_batch)
        self.queued = queued
        pool = torch.cuda.graph_pool_handle() if capture else None
        self._lock = threading.Lock()  # one set of buffers; with batching off, calls come from several threads
        self._chains: dict[int, _Chain] = {}
        with torch.inference_mode():
            for size in sorted(self.sizes, reverse=True):  # largest first: the smaller graphs reuse its pool
                pixels = torch.zeros(size, 3, image_size, image_size, device=device, dtype=dtype)
                self._chains[size] = _Chain(segments, pixels, capture, pool)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parts = []
        for part in pixel_values.split(self.sizes[-1]):
            chain = self._chains[smallest_fitting(self.sizes, len(part))]
            with self._lock:
                chain.inputs[: len(part)].copy_(part)
                parts.append(chain.run(len(part), self.queued))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class GraphedTextTower:
    """``forward(input_ids, attention_mask)`` on batches padded to captured sizes and lengths."""

    def __init__(
        self,
        forward: Forward,
        max_length: int,
        pad_token_id: int,
        largest_batch: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        self.sizes = batch_sizes(largest_batch)
        self.lengths = text_lengths(max_length)
        self.pad_token_id = pad_token_id
        pool = torch.cuda.graph_pool_handle() if capture else None
        self._lock = threading.Lock()
        self._shapes: dict[tuple[int, int], _Shape] = {}
        with torch.inference_mode():
            for size, length in sorted(product(self.sizes, self.lengths), reverse=True):
                inputs = {
                    "input_ids": torch.empty((size, length), device=device, dtype=torch.long),
                    "attention_mask": torch.empty((size, length), device=device, dtype=torch.long),
                }
                self._pad(inputs["input_ids"], inputs["attention_mask"])
                self._shapes[(size, length)] = _Shape(forward, inputs, capture, pool)

    def _pad(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Fill static buffers with padding rows. They attend to their first token: a row with no
        token to attend to is NaN in SDPA."""
        ids.fill_(self.pad_token_id)
        mask.zero_()
        mask[:, 0] = 1

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = smallest_fitting(self.lengths, input_ids.shape[1])
        parts = []
        for ids, mask in zip(input_ids.split(self.sizes[-1]), attention_mask.split(self.sizes[-1]), strict=True):
            rows = len(ids)
            shape = self._shapes[(smallest_fitting(self.sizes, rows), length)]
            with self._lock:
                static_ids, static_mask = shape.inputs["input_ids"], shape.inputs["attention_mask"]
                self._pad(static_ids, static_mask)
                static_ids[:rows, : ids.shape[1]].copy_(ids)
                static_mask[:rows, : mask.shape[1]].copy_(mask)
                parts.append(shape.run(rows))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
