"""The ONNX Runtime backend: an export directory from `python -m export`, on the CUDA or the CPU provider.

The graph takes the KV cache as a fixed-size buffer (rows x positions) and writes each step's keys/values into
it; binding every present to its past's buffer (IO binding) makes that write in place. So a steady decode step
copies nothing, and its bindings stay as they are: only the new tokens, the rows' lengths and which logits to
return change. On the CPU the running batch's cache is a view of one preallocated flat host buffer per tensor
(virtual until touched); on CUDA it lives on the device as OrtValues, and any change to the batch goes through
the host copy.

Prefilled prompts wait on the host ("parked") until the next decode step takes them into the batch as new last
rows. A request leaving moves the batch's last row into its place; a running request left out of a step (rare)
is parked again, its cache copied out. The cache holds `capacity` positions per row, grown CHUNK at a time as
the longest row needs (one copy of the batch's cache per CHUNK steps), and attention reads all of them: the
positions beyond a row's length are masked. Against the concatenating graph of format 1 (GPT-2-small, 2 cores),
a 16-row step at ~460 positions went from 56-58 to 41-43 ms, at ~910 from 73-93 to 56-59 ms.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.runtime import CUDA, MODEL_FILE, ExportError, create_session, past_names, present_names, read_export

log = logging.getLogger(__name__)


class OnnxBackend:
    name = "onnx"
    # sampling on one torch thread: an idle torch thread spinning after a parallel op on the logits slowed
    # batch-16 steps ~30% (GPT-2-small, 2 cores: 36 -> 27 ms), and ORT's threads are the ones to keep busy
    torch_threads = 1
    CHUNK = 64  # positions the cache grows by: attention reads at most CHUNK - 1 unused ones per row

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
        try:
            self.session = create_session(d / MODEL_FILE, device, threads or torch.get_num_threads(), spin)
        except Exception as e:  # ONNX Runtime's errors derive from Exception alone
            raise ExportError(f"{d / MODEL_FILE}: ONNX Runtime cannot load it: {' '.join(str(e).split())}") from e
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
        self.bound = False  # whether the binding holds the running batch's cache and logits as they are now
        self.length: dict[int, int] = {}  # slot -> positions in its cache
        self.parked: dict[int, list[np.ndarray]] = {}  # slot -> 2*n_layer (nh, L, hs), not in the batch
        self.batch: list[int] = []  # the running slots, in row order
        self.capacity = 0  # positions per row of the running cache
        # one flat host buffer per cache tensor, sized max_batch x context; zeros, so that what lies beyond a
        # row's length is finite (masked keys' values still meet a zero weight)
        size = max_batch * cfg.n_head * cfg.block_size * cfg.head_dim
        self.buffers = [np.zeros(size, np.float32) for _ in self.past_names]
        self.cache: list[np.ndarray] = []  # views (n, nh, capacity, hs) of the buffers
        # CUDA: the cache lives between steps as OrtValues on the device (the host views are stale meanwhile)
        self.keep_on_device = self.device == "cuda"
        self.device_cache: list[ort.OrtValue] | None = None
        # decode steps write their logits (n, 1, V) here: no ORT allocation, no OrtValue wrappers to fetch
        self.logits = np.empty((max_batch, 1, cfg.vocab_size), np.float32)

    # -- Backend ------------------------------------------------------------------------------------------

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """All prompts in one pass, right-padded; their caches are parked on the host until the next decode."""
        for s in slots:
            if s in self.length:
                raise ValueError(f"slot {s} is in use")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.config.block_size:
            raise ValueError(f"prompt lengths must be in [1, {self.config.block_size}], got {lengths}")
        cfg = self.config
        n, T = len(prompts), max(lengths)
        ids = np.full((n, T), self.tokenizer.pad_id, np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        cache = [np.empty((n, cfg.n_head, T, cfg.head_dim), np.float32) for _ in self.past_names]  # all written
        logits = np.empty((n, 1, cfg.vocab_size), np.float32)
        self._bind_step(ids, np.zeros(n, np.int64), np.array(lengths)[:, None] - 1)
        self._bind_host(cache, logits)
        self.bound = False  # the binding now holds this call's arrays
        self.session.run_with_iobinding(self.binding)
        for b, (s, L) in enumerate(zip(slots, lengths)):
            self.parked[s] = [a[b, :, :L] for a in cache]
            self.length[s] = L
        return torch.from_numpy(logits[:, -1])

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
        for s in [s for s in self.batch if s not in slots]:  # rare: the scheduler releases ended requests first
            self._park(s)
        joining = [s for s in slots if s not in self.batch]
        need = max(self.length[s] for s in slots) + 1
        if need > self.capacity:
            self._resize(min(-(-need // self.CHUNK) * self.CHUNK, self.config.block_size))
        if joining:
            self._append(joining)
        n = len(self.batch)
        rows = [self.batch.index(s) for s in slots]  # the batch keeps its order; the caller's may differ
        ids = np.empty((n, 1), np.int64)
        ids[rows, 0] = tokens
        self._bind_step(ids, np.array([self.length[s] for s in self.batch], np.int64), np.zeros((n, 1), np.int64))
        if not self.bound:
            self._bind_cache()
        self.session.run_with_iobinding(self.binding)
        for s in slots:
            self.length[s] += 1
        return torch.from_numpy(self.logits[rows, -1])  # (n, V), a copy: the next step rewrites self.logits

    def release(self, slot: int) -> None:
        del self.length[slot]
        self.parked.pop(slot, None)
        if slot in self.batch:
            self._remove(slot)

    # -- internals ----------------------------------------------------------------------------------------

    def _views(self, n: int, capacity: int) -> list[np.ndarray]:
        """The buffers' first n rows shaped (n, nh, capacity, hs): contiguous, as ORT needs them."""
        shape = (n, self.config.n_head, capacity, self.config.head_dim)
        size = math.prod(shape)
        return [b[:size].reshape(shape) for b in self.buffers]

    def _resize(self, capacity: int) -> None:
        """Lay the running rows out `capacity` positions apart, within their buffers."""
        self._to_host()
        n, old = len(self.batch), self.capacity
        for src, dst in zip(self._views(n, old), self._views(n, capacity)):
            dst[:, :, :old] = src  # overlapping ranges of one buffer: numpy copies through a temporary
        self.cache, self.capacity = self._views(n, capacity), capacity
        self.bound = False

    def _append(self, slots: list[int]) -> None:
        """Parked `slots` become new last rows; the running rows stay where they are."""
        self._to_host()
        n = len(self.batch)
        self.cache = self._views(n + len(slots), self.capacity)
        for row, s in enumerate(slots, start=n):
            for dst, src in zip(self.cache, self.parked.pop(s)):
                dst[row, :, :src.shape[1]] = src
        self.batch += slots
        self.bound = False

    def _park(self, slot: int) -> None:
        """Take a running slot out of the batch, its cache copied out (the buffers are reused)."""
        self._to_host()
        row = self.batch.index(slot)
        self.parked[slot] = [a[row, :, :self.length[slot]].copy() for a in self.cache]
        self._remove(slot)

    def _remove(self, slot: int) -> None:
        """Drop a slot's row: the last row moves into its place."""
        self._to_host()
        row, last = self.batch.index(slot), len(self.batch) - 1
        if row != last:
            for a in self.cache:
                a[row] = a[last]
            self.batch[row] = self.batch[last]
        self.batch.pop()
        self.cache = [a[:last] for a in self.cache]  # prefixes: still contiguous
        if not self.batch:
            self.capacity = 0  # the next batch starts short again
        self.bound = False

    def _bind_step(self, ids: np.ndarray, past_lengths: np.ndarray, logits_index: np.ndarray) -> None:
        # the binding points into these arrays without holding them: they live until the next step's
        self.step_inputs = (ids, past_lengths, logits_index)
        for name, a in zip(("input_ids", "past_lengths", "logits_index"), self.step_inputs):
            self.binding.bind_cpu_input(name, a)

    def _bind_host(self, cache: list[np.ndarray], logits: np.ndarray) -> None:
        """Bind each present to its past's host array (the write is in place) and the logits to `logits`."""
        io = self.binding
        for past, present, a in zip(self.past_names, self.present_names, cache):
            io.bind_cpu_input(past, a)
            io.bind_output(present, "cpu", 0, np.float32, a.shape, a.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)

    def _bind_cache(self) -> None:
        """Bind the running batch's cache (host views, or device copies of them) and self.logits."""
        logits = self.logits[:len(self.batch)]
        if not self.keep_on_device:
            self._bind_host(self.cache, logits)
        else:
            io = self.binding
            self.device_cache = []
            for past, present, a in zip(self.past_names, self.present_names, self.cache):
                v = ort.OrtValue.ortvalue_from_shape_and_type(a.shape, np.float32, self.device, 0)
                v.update_inplace(a)  # a copy (from_numpy would share a CPU array's memory)
                self.device_cache.append(v)
                io.bind_ortvalue_input(past, v)
                io.bind_ortvalue_output(present, v)
            io.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.bound = True

    def _to_host(self) -> None:
        """CUDA: bring the cache back to the host views before the batch changes."""
        if self.device_cache is not None:
            for a, v in zip(self.cache, self.device_cache):
                a[...] = v.numpy()
            self.device_cache = None
