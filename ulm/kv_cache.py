"""The KV cache: every layer's keys and values, preallocated, written in place as sequences grow.

Shapes: n_layer layers, B rows (one sequence each), nh heads, L = max_len positions, hs head size, T new tokens.
"""
from __future__ import annotations

import math
import mmap

import torch

from ulm.config import GPTConfig

# One layer's part of a cached step, as MultiHeadAttention takes it (a plain tuple: built per layer per step):
# (k, v) views (B, nh, L, hs) of the layer's rows, where the new tokens go, and `length` (attend to positions
# [0, length)). `where` None: every row's new T tokens are its last T positions (one slice for all rows); otherwise
# the flat index (B * nh * T,) of each new (row, head, token) in the layer's cache viewed as (B * nh * L, hs), built
# once per step for every layer.
LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros that, on the CPU, takes memory only where it is written: anonymous mmap pages, which the OS
    zeroes on first touch (torch.zeros writes every byte up front: a 32-slot GPT-2-small cache is 2.4 GB)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def write_kv(cache: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's keys/values (B, nh, T, hs) in place at each row's positions; return the first `length`
    cached (B, nh, length, hs): a plain copy into one slice, or one indexed copy (see LayerCache)."""
    k_cache, v_cache, where, length = cache
    if where is None:
        T = k.shape[2]
        k_cache.narrow(2, length - T, T).copy_(k)
        v_cache.narrow(2, length - T, T).copy_(v)
    else:
        hs = k.shape[3]
        k_cache.view(-1, hs).index_copy_(0, where, k.reshape(-1, hs).to(k_cache.dtype))
        v_cache.view(-1, hs).index_copy_(0, where, v.reshape(-1, hs).to(v_cache.dtype))
    return k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length)


class KVCache:
    """Preallocated keys and values: (n_layer, max_batch, nh, max_len, hs) each, written in place.

    A row (slot) holds one sequence; rows may hold sequences of different lengths. Models take a contiguous
    range of rows (a slice, so the per-layer buffers are views and writes land in the cache).
    """

    def __init__(self, n_layer: int, max_batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, max_batch, n_head, max_len, head_dim)
        self.k = zeros_on_demand(shape, dtype, device)
        self.v = zeros_on_demand(shape, dtype, device)
        self.masks: dict[torch.dtype, torch.Tensor] = {}  # dtype -> additive causal table (L, L), made when needed
        self.row_starts: dict[int, torch.Tensor] = {}  # B -> where each (row, head) starts in a flat layer (B, nh, 1)

    @classmethod
    def for_model(cls, cfg: GPTConfig, max_batch: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        return cls(cfg.n_layer, max_batch, cfg.n_head, max_len or cfg.block_size, cfg.head_dim, dtype, device)

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i, rows], self.v[i, rows]  # (B, nh, L, hs) views

    def attention_mask(self, input_pos: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive mask (B, 1, T, length) of a cached step: each query sees its row's positions up to its own.
        None when every row's one new token is at position length - 1 and so sees the whole cache."""
        B, T = input_pos.shape
        if T == 1 and (B == 1 or int(input_pos.min()) == length - 1):
            return None
        return self.causal_rows(input_pos, length, dtype)

    def causal_rows(self, input_pos: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        """attention_mask's rows of a causal table (row p: 0 up to key p, -inf after), made once per dtype: a step
        builds its mask in one indexing op, not five, and without reading a value on the host (CUDA graphs);
        additive, because SDPA would convert a boolean mask in every layer."""
        if (table := self.masks.get(dtype)) is None:
            L = self.max_len
            table = self.masks[dtype] = torch.full((L, L), -math.inf, dtype=dtype, device=self.k.device).triu_(1)
        return table.narrow(1, 0, length)[input_pos][:, None]  # (B, 1, T, length)

    def layers(self, rows: slice, input_pos: torch.Tensor, length: int, at_end: bool) -> list[LayerCache]:
        """Each layer's part of a step over cache rows `rows` (views: writes land in the cache). at_end: every row's
        new tokens are its last positions."""
        k, v = self.k, self.v
        where = None
        if not at_end:
            B = input_pos.shape[0]
            if (starts := self.row_starts.get(B)) is None:  # made once per row count: a third of the index's cost
                starts = self.row_starts[B] = torch.arange(B * k.shape[2], device=k.device).view(B, -1, 1) * k.shape[3]
            where = (starts + input_pos.unsqueeze(1)).view(-1)
        return [(k[i, rows], v[i, rows], where, length) for i in range(k.shape[0])]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (to keep live rows contiguous)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
