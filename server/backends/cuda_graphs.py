"""Decode steps replayed from CUDA graphs: one launch a step instead of one per kernel.

At one token per row a small model's step on a GPU is hundreds of tiny kernels, each launched by Python in a few
microseconds, so the GPU waits for the launches (gpt-fast's observation; its answer is torch.compile's CUDA graphs).
Here each batch size of a bucket (1, 2, 4, ... max_batch) gets a graph of GPT.decode_step over cache rows 0..b-1,
captured once at load over static input tensors; a step of n rows copies its tokens and positions in, replays the
smallest bucket's graph that holds them and reads the first n rows of logits. The padding rows n..b-1 are free
rows (the backend keeps live rows at 0..n-1): their junk key at position 0 is overwritten by the next prefill there.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GraphedDecode:
    def __init__(self, model, cache, max_batch: int):
        self.model, self.cache = model, cache
        self.buckets = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all of them
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        for b in reversed(self.buckets):  # the largest first, as PyTorch advises for a shared pool
            self.graphs[b] = self._capture(b)
        log.info("decode steps replay CUDA graphs of %s rows", self.buckets)

    @torch.inference_mode()
    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """(the graph, its input (2, b, 1): tokens and positions, its output logits (b, V))."""
        inputs = torch.zeros(2, b, 1, dtype=torch.long, device=self.cache.k.device)
        rows = slice(0, b)
        side = torch.cuda.Stream()  # warm-up off the default stream: lazy allocations, cuBLAS workspaces
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.model.decode_step(inputs[0], inputs[1], self.cache, rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.decode_step(inputs[0], inputs[1], self.cache, rows)
        return graph, inputs, logits

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, V), on the GPU, of one step of cache rows 0..n-1 (every live row, in row order)."""
        n = len(tokens)
        graph, inputs, logits = self.graphs[self.bucket(n)]
        pad = [0] * (inputs.shape[1] - n)
        inputs.copy_(torch.tensor([tokens + pad, positions + pad]).view(inputs.shape))
        graph.replay()
        return logits[:n]


def graphed_decode(model, cache, max_batch: int) -> GraphedDecode | None:
    """GraphedDecode for a model on a GPU, or None where capture fails (the backend then launches each kernel)."""
    try:
        return GraphedDecode(model, cache, max_batch)
    except Exception:
        log.exception("capturing the decode step in CUDA graphs failed; decoding without them")
        return None
