"""The interface every inference backend implements; the scheduler drives it and knows nothing else.

The scheduler owns slots 0..max_batch-1 (one per running request). A backend keeps a KV cache per slot,
prefills new prompts into slots, runs one batched decode step over any set of live slots, and frees a slot
when its request leaves. Logits come back as float32 CPU torch tensors, so sampling is shared.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ulm.config import GPTConfig
from ulm.tokenizer import Tokenizer


class Backend(Protocol):
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

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run each prompt into its (free) slot from position 0. Returns last-position logits (n, V)."""
        ...

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step: tokens[i] at positions[i] for slots[i], each extending that slot's cache. Logits (n, V)."""
        ...

    def release(self, slot: int) -> None:
        """Forget the slot's sequence; the slot may be prefilled again."""
        ...



def warmup(backend: Backend) -> None:
    """Run a small prefill and decode (two rows of different lengths, so the padded path too) so the first
    real request pays no one-off costs."""
    slots = list(range(min(2, backend.max_batch)))
    backend.prefill(slots, [[0] * (i + 1) for i in slots])
    backend.decode(slots, [0] * len(slots), [i + 1 for i in slots])
    for s in slots:
        backend.release(s)
