"""The interface every inference backend implements; the scheduler drives it and knows nothing else.

The scheduler owns slots 0..max_batch-1 (one per running request). A backend keeps a KV cache per slot,
prefills new prompts into slots, runs one batched decode step over any set of live slots, and frees a slot
when its request leaves. Logits come back as float32 CPU torch tensors, so sampling is shared.
"""
from __future__ import annotations

from typing import Protocol

from ulm.config import GPTConfig
from ulm.generate import Stepper, decode_loop
from ulm.tokenizer import Tokenizer


class Backend(Stepper, Protocol):
    """A ulm.generate.Stepper (prefill, decode, release over slots) that also describes its model."""

    name: str  # "torch" | "onnx"
    device: str  # "cpu" | "cuda"
    dtype: str  # e.g. "float32", "int8"
    model_name: str
    config: GPTConfig
    tokenizer: Tokenizer
    max_batch: int
    num_params: int
    # torch's intra-op threads for the caller's work on the logits (sampling), or None to keep the caller's. A
    # backend whose model runs outside torch says 1: torch's OpenMP threads spin for milliseconds after each
    # parallel op (sampling's softmax or top-k over a batch's logits), on the cores the backend's own threads need.
    torch_threads: int | None


ONE_THREAD_PARAMS = 1_000_000


def model_threads(backend: Backend, threads: int) -> int | None:
    """The model's torch threads: the backend's own, else `threads` (--threads), else one for a model under
    ONE_THREAD_PARAMS parameters, else None: one per core that jobs leave (server.engine.Engine.share_cores).

    A model that small runs a decode step as fast on one thread as on two (its products are too small to share),
    and a second thread's OpenMP spinning after every op takes the core that the streams and their clients need
    (docs/performance-log.md, "The model in its own process")."""
    if backend.torch_threads:
        return backend.torch_threads
    if threads:
        return threads
    return 1 if backend.num_params < ONE_THREAD_PARAMS else None


def warmup(backend: Backend) -> None:
    """Run a small prefill and decode (two rows of different lengths, so the padded path too) so the first
    real request pays no one-off costs."""
    decode_loop(backend, [[0] * (i + 1) for i in range(min(2, backend.max_batch))], 2)
