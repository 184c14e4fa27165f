"""The ONNX Runtime backend: an export directory from `python -m export`, on the CUDA or the CPU provider.

The graph takes the past keys/values as inputs and returns them extended by the new tokens (present), so the
cache lives outside it. Between decode steps it stays where the graph wrote it: each step's presents are
bound (IO binding) as the next step's past, with an attention mask saying which positions of each row are
real. On CUDA the presents are OrtValues on the device. On the CPU they are written into one of two
preallocated flat host buffers per tensor (the past is read from one while the present goes to the other),
so the steady state allocates nothing and copies nothing beyond the graph's own concat.

Prefilled prompts wait on the host ("parked") until the next decode step takes them into the batch. On the
CPU, a request leaving moves the batch's last row into its place, and one joining becomes a new last row,
right-padded (with zeros, mask 0) to the batch's past length: a row's copy each, not the batch's. Otherwise
(on CUDA, a prompt longer than the batch's past, a step over some of the running slots only) the batch is
rebuilt once: each slot's real positions are copied into the new layout, rows right-padded to the longest.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import MODEL_FILE, past_names, present_names
from export.runtime import CUDA, create_session, read_export

log = logging.getLogger(__name__)


class OnnxBackend:
    name = "onnx"
    # sampling on one torch thread: an idle torch thread spinning after a parallel argmax slowed batch-16 steps
    # ~30% (GPT-2-small, 2 cores: 36 -> 27 ms), and ORT's threads are the ones to keep busy
    torch_threads = 1

    def __init__(self, export_dir: str | Path, device: str = "cpu", max_batch: int = 32,
                 threads: int | None = None, spin: bool = True):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        d = Path(export_dir)
        manifest, self.config, self.tokenizer = read_export(d)
        self.dtype = manifest.get("dtype", "float32")
        if self.dtype == "int8" and device == "cuda":
            raise ValueError("this export is int8 (dynamic quantization), which is for the CPU: it runs slower than "
                             "fp32 on the CUDA provider. Serve it with --device cpu, or export without --quantize "
                             "for CUDA")
        # intra-op threads: the server's --threads (it sets torch's count), so one flag sizes either backend
        self.session = create_session(d / MODEL_FILE, device, threads or torch.get_num_threads(), spin)
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        if device == "cuda" and self.device != "cuda":
            log.warning("CUDA execution provider unavailable (available: %s); falling back to %s",
                        ", ".join(ort.get_available_providers()), self.providers[0])
        log.info("onnx backend: %s (%s) on %s, providers in use: %s", d, self.dtype, self.device,
                 ", ".join(self.providers))
        self.model_name = manifest.get("name") or d.resolve().name
        self.max_batch = max_batch
        self.num_params = int(manifest.get("num_params", 0))
        cfg = self.config
        self.past_names, self.present_names = past_names(cfg.n_layer), present_names(cfg.n_layer)
        self.binding = self.session.io_binding()
        self.length: dict[int, int] = {}  # slot -> positions in its cache
        self.parked: dict[int, list[np.ndarray]] = {}  # slot -> 2*n_layer (nh, L, hs), not in the batch
        # the running batch: its slots (None once released), past (n, nh, P, hs) per tensor, mask (n, P)
        self.batch: list[int | None] = []
        self.past: list = []
        self.mask = np.zeros((0, 0), np.int64)
        # CPU: two flat buffers per past tensor, sized for max_batch x context (virtual until touched)
        capacity = max_batch * cfg.n_head * cfg.block_size * cfg.head_dim
        self.buffers = ([[np.empty(capacity, np.float32) for _ in self.past_names] for _ in range(2)]
                        if self.device == "cpu" else None)
        self.spare = 0  # the buffer set the next present goes to
        # CPU decode steps write their logits (n, 1, V) here: no ORT allocation, no OrtValue wrappers to fetch
        self.logits = np.empty((max_batch, 1, cfg.vocab_size), np.float32) if self.device == "cpu" else None

    # -- Backend ------------------------------------------------------------------------------------------

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """All prompts in one pass, right-padded; their caches are parked on the host until the next decode."""
        for s in slots:
            if s in self.length:
                raise ValueError(f"slot {s} is in use")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.config.block_size:
            raise ValueError(f"prompt lengths must be in [1, {self.config.block_size}], got {lengths}")
        n, T = len(prompts), max(lengths)
        ids = np.full((n, T), self.tokenizer.pad_id, np.int64)
        mask = np.zeros((n, T), np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)], mask[b, :len(p)] = p, 1
        pos = np.broadcast_to(np.arange(T), (n, T))
        empty = np.zeros((n, self.config.n_head, 0, self.config.head_dim), np.float32)
        logits, present = self._run(ids, pos, mask, np.array(lengths)[:, None] - 1, [empty] * len(self.past_names),
                                    to_host=True)
        for b, (s, L) in enumerate(zip(slots, lengths)):
            self.parked[s] = [a[b, :, :L] for a in present]
            self.length[s] = L
        return torch.from_numpy(logits[:, -1])  # (n, V)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot, each at its slot's next position."""
        if len(slots) > self.max_batch:
            raise ValueError(f"{len(slots)} slots exceed max_batch ({self.max_batch})")
        for s, p in zip(slots, positions):
            if s not in self.length:
                raise ValueError(f"slot {s} holds no sequence")
            if p != self.length[s]:
                raise ValueError(f"slot {s} has {self.length[s]} positions cached; cannot decode at position {p}")
            if p >= self.config.block_size:
                raise ValueError(f"position {p} is beyond the context length {self.config.block_size}")
        if None in self.batch or sorted(slots) != sorted(self.batch):
            joining = [s for s in slots if s not in self.batch]
            # CPU (whose batch has no released rows left in it): newcomers no longer than the batch's past append
            if (self.buffers is not None and self.batch and set(self.batch) <= set(slots) and joining
                    and max(self.length[s] for s in joining) <= self.mask.shape[1]):
                self._append(joining)
            else:
                self._rebuild(slots)
        n = len(self.batch)
        rows = [self.batch.index(s) for s in slots]  # the batch keeps its order; the caller's may differ
        ids, pos = np.zeros((n, 1), np.int64), np.zeros((n, 1), np.int64)
        ids[rows, 0], pos[rows, 0] = tokens, positions
        mask = np.concatenate([self.mask, np.ones((n, 1), np.int64)], axis=1)
        logits, self.past = self._run(ids, pos, mask, np.zeros((n, 1), np.int64), self.past)
        self.mask = mask
        for s in slots:
            self.length[s] += 1
        return torch.from_numpy(logits[rows, -1])  # (n, V), a copy: the next step rewrites self.logits

    def release(self, slot: int) -> None:
        del self.length[slot]
        self.parked.pop(slot, None)
        if slot not in self.batch:
            return
        row = self.batch.index(slot)
        if self.buffers is None:  # CUDA: the row stays until the batch is rebuilt; it is never fed again
            self.batch[row] = None
            return
        last = len(self.batch) - 1  # CPU: the last row moves into the hole and the batch shrinks by one
        if row != last:
            for a in self.past:
                a[row] = a[last]
            self.mask[row], self.batch[row] = self.mask[last], self.batch[last]
        self.batch.pop()
        self.past, self.mask = [a[:last] for a in self.past], self.mask[:last]  # prefixes: still contiguous

    # -- internals ----------------------------------------------------------------------------------------

    def _next_buffers(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Views of the spare host buffer set, shaped (n, nh, P, hs): contiguous, as ORT needs them."""
        size = math.prod(shape)  # not np.prod: this runs 2 x n_layer times a step
        views = [b[:size].reshape(shape) for b in self.buffers[self.spare]]
        self.spare ^= 1
        return views

    def _run(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, logits_index: np.ndarray, past: list,
             to_host: bool = False) -> tuple[np.ndarray, list]:
        """One graph call through IO binding. Logits come back to the host as numpy; presents go to the next
        host buffer set (CPU), to new host arrays (to_host), or stay on the device as OrtValues (CUDA)."""
        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, a in (("input_ids", ids), ("position_ids", pos), ("attention_mask", mask),
                        ("logits_index", logits_index)):
            io.bind_cpu_input(name, np.ascontiguousarray(a, np.int64))
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, value)
        n, P = mask.shape
        shape = (n, self.config.n_head, P, self.config.head_dim)
        if to_host or self.buffers is None:
            io.bind_output("logits", "cpu")
            for name in self.present_names:  # fresh outputs every step: their shapes grow by one position
                io.bind_output(name, "cpu" if to_host else self.device)
            self.session.run_with_iobinding(io)
            logits, *outputs = io.get_outputs()
            return logits.numpy(), [o.numpy() for o in outputs] if to_host else outputs
        logits = self.logits[:n]
        io.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        present = self._next_buffers(shape)
        for name, a in zip(self.present_names, present):
            io.bind_output(name, "cpu", 0, np.float32, shape, a.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits, present

    def _append(self, slots: list[int]) -> None:
        """Parked `slots` become new rows after the running ones (CPU), right-padded to the batch's past length
        P: the running rows stay where they are in the buffer set that holds the past."""
        n, P = self.mask.shape
        cfg = self.config
        shape = (n + len(slots), cfg.n_head, P, cfg.head_dim)
        size = math.prod(shape)
        self.past = [b[:size].reshape(shape) for b in self.buffers[self.spare ^ 1]]  # spare: the next present's
        self.mask = np.concatenate([self.mask, np.zeros((len(slots), P), np.int64)])
        for row, s in enumerate(slots, start=n):
            self.mask[row, :self._place(self.past, row, self.parked.pop(s))] = 1
        self.batch += slots

    @staticmethod
    def _place(past: list[np.ndarray], row: int, cache: list[np.ndarray]) -> int:
        """Write a slot's (nh, L, hs) keys/values into `row` of the batch's past, zeros after; returns L."""
        L = cache[0].shape[1]
        for dst, src in zip(past, cache):
            dst[row, :, :L] = src
            dst[row, :, L:] = 0  # padding is masked, but must be finite: 0 * NaN would leak through
        return L

    def _rebuild(self, slots: list[int]) -> None:
        """Make `slots` (in this order) the running batch: every row compacted, right-padded to the longest."""
        keep = set(slots)
        kv = [v if isinstance(v, np.ndarray) else v.numpy() for v in self.past]  # (n, nh, P, hs) on the host
        for row, s in enumerate(self.batch):
            if s is None:
                continue
            real = np.flatnonzero(self.mask[row])
            L = len(real)
            if real[-1] == L - 1:  # a prefix: a view, no copy yet
                cache = [a[row, :, :L] for a in kv]
            else:  # holes where the row was padded before it grew
                cache = [a[row][:, real] for a in kv]
            # a row that waits outside the batch must not point into a buffer the next steps overwrite
            self.parked[s] = cache if s in keep else [np.array(c) for c in cache]
        n, P = len(slots), max(self.length[s] for s in slots)
        cfg = self.config
        shape = (n, cfg.n_head, P, cfg.head_dim)
        past = (self._next_buffers(shape) if self.buffers is not None
                else [np.empty(shape, np.float32) for _ in self.past_names])
        self.mask = np.zeros((n, P), np.int64)
        for row, s in enumerate(slots):
            self.mask[row, :self._place(past, row, self.parked.pop(s))] = 1
        self.past = past if self.buffers is not None else [ort.OrtValue.ortvalue_from_numpy(a, self.device, 0)
                                                           for a in past]
        self.batch = list(slots)
