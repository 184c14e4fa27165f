"""The PyTorch backend: a ulm GPT and one preallocated KVCache row per running request.

Live requests occupy cache rows 0..n-1 (a request leaving moves the last row into its place), so a decode step
over all of them is one forward pass over the rows slice(0, n), with views into the cache rather than copies.
"""
from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import numpy as np
import torch

from server.backends.cuda_graphs import graphed_decode
from ulm.checkpoint import load_checkpoint
from ulm.kv_cache import KVCache
from ulm.quantize import check_quantize


class TorchBackend:
    name = "torch"
    torch_threads = None  # the model's own

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", max_batch: int = 32,
                 quantize: str | None = None, cuda_graphs: bool = True):
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but torch sees no CUDA device")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        check_quantize(quantize, device)
        self.model, self.tokenizer, meta = load_checkpoint(checkpoint_dir, device=device)
        self.num_params = self.model.num_params()  # before quantizing: int8 Linear weights are not Parameters
        # CPU weight layouts for decoding; the packed copies serve batches (more than one row per matmul) of up to
        # max_batch rows: oneDNN keeps a kernel per row count, so a prefill's (prompts x padded length) goes to MKL.
        # quantize="int8": the Linear layers become int8 ones first (ulm.quantize); any fp32 one left is laid out
        self.model.prepare_for_inference(pack=max_batch > 1, max_rows=max_batch, quantize=quantize)
        self.config = self.model.config
        self.device = device
        self.dtype = quantize or str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.model_name = meta.get("name") or Path(checkpoint_dir).resolve().name
        self.max_batch = max_batch
        self.cache = KVCache.for_model(self.config, max_batch, dtype=next(self.model.parameters()).dtype,
                                       device=device)
        cfg = self.config  # the largest tensor of a decode step (fp32): its logits or feed-forward activations
        step_bytes = 4 * max_batch * max(cfg.vocab_size, cfg.d_ff, 3 * cfg.n_embd)
        self.malloc_threshold = return_large_frees(step_bytes) if device == "cpu" else None
        self.row_of: dict[int, int] = {}  # slot -> cache row
        self.slot_at: list[int] = []  # cache row -> slot, for rows 0..n-1
        self.length: list[int] = []  # cache row -> positions written
        # on a GPU, steps over every live row replay a captured graph (None: each kernel launched from Python)
        self.graphs = graphed_decode(self.model, self.cache, max_batch) if device == "cuda" and cuda_graphs else None

    @torch.inference_mode()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """All prompts in one pass, padded on the right into the next free rows; logits at each prompt's end."""
        for s in slots:
            if s in self.row_of:
                raise ValueError(f"slot {s} is in use")
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        pad = self.tokenizer.pad_id
        idx = torch.tensor([p + [pad] * (T - len(p)) for p in prompts], device=self.device)  # (k, T)
        pos = torch.arange(T, device=self.device).expand(len(prompts), T)
        first = len(self.slot_at)
        rows = slice(first, first + len(prompts))
        # padding writes junk keys past each prompt's end; decode overwrites a position before attending to it
        logits = self.model(idx, pos, self.cache, rows, logits_at=torch.tensor(lengths, device=self.device) - 1)
        for s, n in zip(slots, lengths):  # only now: a failed pass leaves the rows free
            self.row_of[s] = len(self.slot_at)
            self.slot_at.append(s)
            self.length.append(n)
        return logits[:, -1].float().cpu()  # (k, V)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot. The usual step, every live row in row order, is one pass over rows 0..n-1 (replayed
        from a CUDA graph on a GPU); otherwise slots are grouped into runs of adjacent rows, a pass each."""
        rows = [self.row_of[s] for s in slots]
        if rows and rows == list(range(len(self.slot_at))):
            if self.graphs is not None and max(positions) < self.cache.max_len:
                logits = self.graphs(tokens, positions)
            else:
                logits = self.model(self.column(tokens), self.column(positions), self.cache, slice(0, len(rows)))[:, -1]
            self.length = [p + 1 for p in positions]
            return logits.float().cpu()  # (n, V)
        order = sorted(range(len(slots)), key=rows.__getitem__)
        out = torch.empty(len(slots), self.config.vocab_size)  # (n, V) in the caller's order
        start = 0
        for end in range(1, len(order) + 1):
            if end < len(order) and rows[order[end]] == rows[order[end - 1]] + 1:
                continue
            run = order[start:end]
            r0 = rows[run[0]]
            idx = self.column([tokens[i] for i in run])  # (b, 1)
            pos = self.column([positions[i] for i in run])
            out[run] = self.model(idx, pos, self.cache, slice(r0, r0 + len(run)))[:, -1].float().cpu()  # (b, V)
            for i in run:
                self.length[rows[i]] = positions[i] + 1
            start = end
        return out

    def column(self, values: list[int]) -> torch.Tensor:
        """Python ints as a (n, 1) int64 tensor on the device: through numpy, 5x faster than torch.tensor on a list
        of lists (16 rows: 1.7 against 8.3 us, twice a step)."""
        return torch.from_numpy(np.array(values, dtype=np.int64)).view(-1, 1).to(self.device)

    def release(self, slot: int) -> None:
        row = self.row_of.pop(slot)
        last = len(self.slot_at) - 1
        if row != last:  # keep rows contiguous: the last live row moves into the hole
            moved = self.slot_at[last]
            self.cache.move_row(last, row, self.length[last])
            self.slot_at[row], self.length[row] = moved, self.length[last]
            self.row_of[moved] = row
        self.slot_at.pop()
        self.length.pop()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_MIN, MMAP_MAX = 4 << 20, 32 << 20  # glibc refuses an mmap threshold over 32 MiB (64-bit)


def return_large_frees(step_bytes: int) -> int | None:
    """Have glibc map every allocation of at least a threshold on its own and unmap it when freed; returns the
    threshold (None: not glibc, or the decode step's tensors are too large for one).

    glibc's default threshold moves: after an allocation over it is freed, it rises to that size (up to 32 MiB), and
    allocations under it are carved from the heaps, whose freed memory stays resident. A prefill pass of many
    prompts makes activations of tens of MiB, of another size in almost every pass, so the server's resident memory
    swung with what the heaps held on to (docs/performance-log.md, "Server memory"). A fixed threshold above every
    tensor of a decode step (`step_bytes`: the largest, a batch's logits or feed-forward activations), at least
    4 MiB: a decode step allocates as before, and a large prefill's activations go back to the OS when freed (a page
    fault per 4 kB the next time, small beside the pass's products). The trim threshold follows glibc's own rule,
    twice the mmap threshold. Process-wide: call it where the process serves."""
    threshold = mmap_threshold(step_bytes)
    if threshold is None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or not mallopt(M_MMAP_THRESHOLD, threshold) or not mallopt(M_TRIM_THRESHOLD, 2 * threshold):
        return None
    return threshold


def mmap_threshold(step_bytes: int) -> int | None:
    """The least power of two from 4 MiB that is at least twice `step_bytes`; None over glibc's 32 MiB."""
    threshold = MMAP_MIN
    while threshold < 2 * step_bytes:
        threshold *= 2
    return threshold if threshold <= MMAP_MAX else None
