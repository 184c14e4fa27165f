"""Transformer components and models, from scratch in PyTorch.

Components: LayerNorm, sinusoidal and learned positional encodings, MultiHeadAttention (self and cross,
padding and causal masks), FeedForward, Block (encoder layer, pre- or post-norm), DecoderLayer.
Models: Encoder, Decoder, Transformer (encoder-decoder) and GPT (decoder-only, with a preallocated KV cache).

Shapes: B batch, T query length, S key length, C = n_embd, nh heads, hs = C // nh head size,
L = cache length (context).
"""
from __future__ import annotations

import math
import mmap

import torch
import torch.nn as nn
import torch.nn.functional as F

from ulm.config import GPTConfig, Seq2SeqConfig

# ----------------------------------------------------------------------------------------------------------
# Components


class LayerNorm(nn.Module):
    """Layer normalization with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)). (length, d_model)"""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed encodings, kept as a (non-persistent) buffer: nothing to learn, nothing to save."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]


class LearnedPositionalEncoding(nn.Module):
    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(pos, self.weight)


def positional_encoding(kind: str, max_len: int, d_model: int) -> nn.Module:
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(max_len, d_model)
    return LearnedPositionalEncoding(max_len, d_model)


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout, or nothing to call when p is 0 (most inference): decoding calls these 3 times per layer."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over nh heads, for self- and cross-attention.

    q, k and v projections are packed in one (3C, C) weight, in nn.MultiheadAttention's layout, so that
    self-attention is a single matmul. Masks: `key_padding_mask` (B, S) is True at padding keys (as in
    nn.MultiheadAttention); `causal` hides future keys; `attn_mask` (B or 1, 1, T, S) is True where a
    query may attend (SDPA's convention; or an additive float mask) and overrides both. (Attention over a KV
    cache is GPT's, in GPT.cached_blocks.)
    """

    def __init__(self, d_model: int, n_head: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_head == 0
        self.n_head = n_head
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        if memory is None:
            q, k, v = self.split_heads(self.in_proj(x))
        else:  # cross-attention: queries from x, keys and values from the encoder's output
            w_q, w_kv = self.in_proj.weight.split([C, 2 * C])
            b_q, b_kv = self.in_proj.bias.split([C, 2 * C]) if self.in_proj.bias is not None else (None, None)
            q = self.heads(F.linear(x, w_q, b_q))  # (B, nh, T, hs)
            k, v = map(self.heads, F.linear(memory, w_kv, b_kv).split(C, dim=2))  # (B, nh, S, hs)
        if attn_mask is None:
            attn_mask = build_mask(key_padding_mask, causal, T, k.shape[2], x.device)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, S, C = t.shape
        return t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed projections (B, T, 3C) -> q, k, v (B, nh, T, hs): one view and permute for all three."""
        B, T, C3 = qkv.shape
        return qkv.view(B, T, 3, self.n_head, C3 // (3 * self.n_head)).permute(2, 0, 3, 1, 4).unbind()


def build_mask(
    key_padding_mask: torch.Tensor | None, causal: bool, T: int, S: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean (B or 1, 1, T, S) mask, True where attending is allowed; None when SDPA can do it alone."""
    if key_padding_mask is None:
        return None  # causal alone goes through SDPA's is_causal fast path
    mask = ~key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, S)
    if causal:
        mask = mask & torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    return mask


def write_kv(
    cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor, length: int,
    at_end: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's keys/values in place at each row's positions; return the first `length` cached.

    cache: (B, nh, L, hs) buffers; k, v: (B, nh, T, hs); input_pos: (B, T). at_end: every row's positions are
    length - T .. length - 1, written as one slice (a plain copy, not an indexed scatter).
    """
    k_cache, v_cache = cache
    if at_end:
        T = k.shape[2]
        k_cache.narrow(2, length - T, T).copy_(k)
        v_cache.narrow(2, length - T, T).copy_(v)
        return k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length)
    rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
    k_cache[rows, :, input_pos] = k.transpose(1, 2).to(k_cache.dtype)  # indexed view is (B, T, nh, hs)
    v_cache[rows, :, input_pos] = v.transpose(1, 2).to(v_cache.dtype)
    return k_cache[:, :, :length], v_cache[:, :, :length]


def activation_layer(name: str) -> nn.Module:
    """"relu", "gelu" (exact) or "gelu_tanh" (GPT-2's approximation) as a module."""
    if name == "relu":
        return nn.ReLU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear, activation, Linear."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = activation_layer(activation)  # GPT.prepare_for_inference may fuse it into fc
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = activation
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(self.act(self.fc(x))))


class Block(nn.Module):
    """Self-attention + feed-forward with residual connections: an encoder layer, or a GPT block.

    Pre-norm: x + f(norm(x)). Post-norm (the original paper): norm(x + f(x)).
    """

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0, norm_first: bool = True, eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.ln_1 = LayerNorm(d_model, bias, eps)
        self.attn = MultiHeadAttention(d_model, n_head, bias, dropout)
        self.ln_2 = LayerNorm(d_model, bias, eps)
        self.mlp = FeedForward(d_model, d_ff, activation, bias, dropout)
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self.attn(self.ln_1(x), **attn_kwargs))
            return x + self.dropout(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.dropout(self.attn(x, **attn_kwargs)))
        return self.ln_2(x + self.dropout(self.mlp(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder's output, feed-forward."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, activation: str = "relu", bias: bool = True,
                 dropout: float = 0.0, norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.ln_1 = LayerNorm(d_model, bias, eps)
        self.self_attn = MultiHeadAttention(d_model, n_head, bias, dropout)
        self.ln_2 = LayerNorm(d_model, bias, eps)
        self.cross_attn = MultiHeadAttention(d_model, n_head, bias, dropout)
        self.ln_3 = LayerNorm(d_model, bias, eps)
        self.mlp = FeedForward(d_model, d_ff, activation, bias, dropout)
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, tgt_padding_mask: torch.Tensor | None = None,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        def sa(h):
            return self.dropout(self.self_attn(h, key_padding_mask=tgt_padding_mask, causal=True))

        def ca(h):
            return self.dropout(self.cross_attn(h, memory, key_padding_mask=memory_padding_mask))

        def ff(h):
            return self.dropout(self.mlp(h))

        if self.norm_first:
            x = x + sa(self.ln_1(x))
            x = x + ca(self.ln_2(x))
            return x + ff(self.ln_3(x))
        x = self.ln_1(x + sa(x))
        x = self.ln_2(x + ca(x))
        return self.ln_3(x + ff(x))


# ----------------------------------------------------------------------------------------------------------
# Models


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class Embedder(nn.Module):
    """Token embedding (scaled by sqrt(C) where the paper does) + positional encoding + dropout."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, pos_encoding: str, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = positional_encoding(pos_encoding, max_len, d_model)
        # Sinusoidal tables have unit scale; the paper scales embeddings by sqrt(C) to match them.
        self.scale = math.sqrt(d_model) if pos_encoding == "sinusoidal" else 1.0
        self.dropout = dropout_layer(dropout)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) * self.scale if self.scale != 1.0 else self.tok(idx)  # one op fewer per decode step
        return self.dropout(x + self.pos(pos))  # (B, T, C)


class Encoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.embed = Embedder(cfg.src_vocab_size, cfg.n_embd, cfg.block_size, cfg.pos_encoding, cfg.dropout)
        self.layers = nn.ModuleList(
            Block(cfg.n_embd, cfg.n_head, cfg.d_ff, activation=cfg.activation, bias=cfg.bias, dropout=cfg.dropout,
                  norm_first=cfg.norm_first, eps=cfg.layer_norm_eps)
            for _ in range(cfg.n_encoder_layer)
        )
        # Pre-norm stacks end with a norm; post-norm layers already end with one.
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, src: torch.Tensor, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(src.shape[1], device=src.device)
        x = self.embed(src, pos)
        for layer in self.layers:
            x = layer(x, key_padding_mask=src_padding_mask)
        return self.ln_f(x)  # (B, S, C)


class Decoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.embed = Embedder(cfg.tgt_vocab_size, cfg.n_embd, cfg.block_size, cfg.pos_encoding, cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.n_embd, cfg.n_head, cfg.d_ff, activation=cfg.activation, bias=cfg.bias,
                         dropout=cfg.dropout, norm_first=cfg.norm_first, eps=cfg.layer_norm_eps)
            for _ in range(cfg.n_decoder_layer)
        )
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_padding_mask: torch.Tensor | None = None,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(tgt.shape[1], device=tgt.device)
        x = self.embed(tgt, pos)
        for layer in self.layers:
            x = layer(x, memory, tgt_padding_mask, memory_padding_mask)
        return self.ln_f(x)  # (B, T, C)


class Transformer(nn.Module):
    """Encoder-decoder for sequence-to-sequence tasks."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.tgt_vocab_size, bias=False)
        self.apply(init_weights)
        if cfg.tie_weights:
            self.lm_head.weight = self.decoder.embed.tok.weight

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_padding_mask: torch.Tensor | None = None,
                tgt_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encoder(src, src_padding_mask)
        h = self.decoder(tgt, memory, tgt_padding_mask, src_padding_mask)
        return self.lm_head(h)  # (B, T, V)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos_id: int, max_len: int,
                      src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: returns (B, max_len) generated ids, BOS excluded."""
        memory = self.encoder(src, src_padding_mask)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            h = self.decoder(out, memory, None, src_padding_mask)
            nxt = self.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
        return out[:, 1:]


class InferenceLinear(nn.Linear):
    """An nn.Linear for CPU inference sharing the parameters of the one it replaces (GPT.prepare_for_inference),
    optionally followed by an activation ("relu", "gelu", "gelu_tanh"), fused into the oneDNN kernel.

    Kernels, as measured on 2-core AMD EPYCs (torch 2.13, fp32):
    - several rows (prefill, batched decoding): oneDNN on the packed copy, ~2x faster than MKL;
    - one row (decoding one sequence) on one thread: MKL's matrix-vector product over the row-major (in, out)
      matrix that the column-major weight is, except in layers that shrink (in > out), whose short rows stream
      poorly (oneDNN there);
    - one row on n > 1 threads: that matrix cut into n contiguous blocks of in/n rows, the blocks' products as
      one batched matmul (torch.bmm, which shares them among the threads) and the n partial sums added. Neither
      library splits a matrix-vector product this well: MKL's runs on one thread, and oneDNN's read GPT-2-small's
      weights at ~21 GB/s where the blocks read at ~25.5 (Zen 4, ~34 GB/s). Paired runs, batch 1, 2 threads:
      GPT-2-small 23.6 -> 20.9 ms a token, the 1 GB preset 58.5 -> 49.5, the "small" one 5.36 -> 5.08;
    - small weights skip oneDNN and the split, whose fixed costs outweigh their speed: oneDNN's ~12 us per call
      always up to PACK_MIN elements (64 x 192: 3 us with MKL, 15 us with oneDNN, at 1 to 64 rows), and both
      for one row up to ONE_ROW_MIN (512 x 512: 15 vs 20 us with oneDNN; the split, in cache, loses at 256 x 256,
      16 vs 20 us, and wins at 768 x 768, 96 vs 62);
    - more than `max_rows` rows (a prefill of several prompts: batch x padded length): MKL on the column-major
      weight. oneDNN makes a kernel (JIT code) for every row count it meets and keeps it, in its primitive cache
      and in ideep's, 1024 entries each: ~0.5 MB of resident memory per row count and weight shape, ~2.3 MiB per
      row count for the "small" preset's five. Prefills of varied prompts meet a new row count almost every pass:
      a server's memory grew by hundreds of MiB over a few thousand requests, and each pass paid for the JIT. Up
      to `max_rows` (the server's batch: every decode step's row count) the kernels are made once; above it MKL,
      without them (the "small" preset's products, 2 cores: from 256 to 4096 rows as fast as oneDNN's with its
      kernels made, up to ~35% slower from 64 to 128 rows in some layers; prefills of 1 to 32 varied prompts
      through the server's backend took 5-10% less time than before, which made kernels as they went).
    """

    POST_OPS = {None: ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
    PACK_MIN, ONE_ROW_MIN = 1 << 14, 1 << 18
    MAX_ROWS = 32  # the default bound on oneDNN's row counts (the server's default batch)

    def __init__(self, linear: nn.Linear, pack: bool, activation: str | None = None, max_rows: int | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max(1, max_rows or self.MAX_ROWS)  # oneDNN runs at most this many rows (one kernel each)
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: tied weights stay tied
        if self.weight.is_contiguous():  # a tied weight is laid out once, by the first module that holds it
            self.weight.data = self.weight.data.t().contiguous().t()
        size = self.weight.numel()
        pack = pack and size > self.PACK_MIN
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16) if pack else None
        self.one_row_packed = size > self.ONE_ROW_MIN  # large enough for one row's own kernels: split or oneDNN
        self.act = activation_layer(activation) if activation else nn.Identity()
        self.post_op, self.algorithm = self.POST_OPS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.act(F.linear(x, self.weight, self.bias))
        rows, threads = x.numel() // self.in_features, torch.get_num_threads()
        one_row = rows == 1
        if one_row and threads > 1 and self.one_row_packed and self.in_features % threads == 0:
            return self.split_product(x, threads)
        if self.packed is not None and rows <= self.max_rows and (not one_row or (
                self.one_row_packed and (self.in_features > self.out_features or threads > 1))):
            # the resolved overload: calling the op packet costs ~8 us of Python dispatch per call
            return torch.ops.mkldnn._linear_pointwise.default(x, self.packed, self.bias, self.post_op, [],
                                                               self.algorithm)
        return self.act(F.linear(x, self.weight, self.bias))

    def split_product(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """One row's product as n blocks of in/n weight rows, shared among n threads (see the class docstring)."""
        K, N = self.in_features, self.out_features
        blocks = self.weight.t().view(n, K // n, N)  # (n, K/n, N): contiguous views, no copy
        y = torch.bmm(x.reshape(n, 1, K // n), blocks).sum(0)  # (n, 1, N) partial sums -> (1, N)
        if self.bias is not None:
            y.add_(self.bias)
        return self.act(y).view(*x.shape[:-1], N)


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros that, on the CPU, takes memory only where it is written: anonymous mmap pages, which the OS
    zeroes on first touch (torch.zeros writes every byte up front: a 32-slot GPT-2-small cache is 2.4 GB)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


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

    @classmethod
    def for_model(cls, cfg: GPTConfig, max_batch: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        return cls(cfg.n_layer, max_batch, cfg.n_head, max_len or cfg.block_size, cfg.head_dim, dtype, device)

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i, rows], self.v[i, rows]  # (B, nh, L, hs) views

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (to keep live rows contiguous)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class GPT(nn.Module):
    """Decoder-only language model (GPT-2 architecture by default)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedder(cfg.vocab_size, cfg.n_embd, cfg.block_size, cfg.pos_encoding, cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.n_embd, cfg.n_head, cfg.d_ff, activation=cfg.activation, bias=cfg.bias, dropout=cfg.dropout,
                  norm_first=cfg.norm_first, eps=cfg.layer_norm_eps)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("attn.out_proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_weights:
            self.lm_head.weight = self.embed.tok.weight

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        rows: slice = slice(None),
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V).

        Without a cache: a causal pass over positions 0..T-1. With a cache: idx holds each row's next tokens
        at positions input_pos (B, T); their keys/values are written into `kv_cache` rows `rows`, and each
        query attends to its row's cached positions up to its own (inference only: no dropout). `logits_at` (B,)
        picks one position per row, so the output layer runs once per row: logits (B, 1, V).
        """
        B, T = idx.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device).expand(B, T)
            length = T
        else:
            length = int(input_pos.max()) + 1  # a cache attends over positions [0, length)
        # check before the position lookup, which would fail with a bare IndexError
        if length > self.config.block_size:
            raise ValueError(f"sequence length {length} exceeds the context length {self.config.block_size}")
        if kv_cache is not None and length > kv_cache.max_len:
            raise ValueError(f"position {length - 1} is beyond the KV cache ({kv_cache.max_len})")
        x = self.embed(idx, input_pos)  # (B, T, C)
        if kv_cache is None:
            for block in self.blocks:
                x = block(x, causal=True)
        else:
            if T == 1 and (B == 1 or int(input_pos.min()) == length - 1):
                mask = None  # one token per row, all at the last position: each sees the whole cache
            else:  # additive, built once: SDPA would convert a boolean mask in every layer
                key_pos = torch.arange(length, device=idx.device)
                allowed = (key_pos[None, None, :] <= input_pos[:, :, None])[:, None]  # (B, 1, T, L)
                mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, -math.inf)
            x = self.cached_blocks(x, kv_cache, rows, input_pos, length, mask)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        return self.lm_head(self.ln_f(x))

    def cached_blocks(self, x: torch.Tensor, kv_cache: KVCache, rows: slice, input_pos: torch.Tensor, length: int,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """The blocks over the KV cache, for inference (no dropout): Block.forward, with each self-attention's new
        keys/values written into the cache and its queries attending to the first `length` positions (through
        `mask`; None: every row's one new token is at position length - 1 and sees all of them).

        Flat, calling each layer's forward directly rather than through nn.Module.__call__ (13 calls per block):
        decoding a token per row is bound by per-call costs. Measured on 2 cores, batch 1, paired runs: the toy
        preset 0.201 -> 0.170 ms per token, GPT-2-small 10.65 -> 10.56 ms."""
        at_end, (B, T, C) = mask is None, x.shape
        for i, block in enumerate(self.blocks):
            a, mlp = block.attn, block.mlp
            h = block.ln_1.forward(x) if block.norm_first else x
            q, k, v = a.split_heads(a.in_proj.forward(h))  # (B, nh, T, hs)
            k, v = write_kv(kv_cache.layer(i, rows), k, v, input_pos, length, at_end)  # (B, nh, length, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
            y = a.out_proj.forward(y.transpose(1, 2).reshape(B, T, C))
            if block.norm_first:
                x = x + y
                x = x + mlp.proj.forward(mlp.act.forward(mlp.fc.forward(block.ln_2.forward(x))))
            else:
                x = block.ln_1.forward(x + y)
                x = block.ln_2.forward(x + mlp.proj.forward(mlp.act.forward(mlp.fc.forward(x))))
        return x

    @torch.no_grad()
    def prepare_for_inference(self, pack: bool = True, max_rows: int | None = None) -> "GPT":
        """Lay the Linear weights out for decoding on the CPU. Returns self, in eval mode; outputs are unchanged.

        Each (out, in) weight becomes a column-major view of a contiguous (in, out) matrix: values, shapes and
        parameters stay (tied weights stay tied), and F.linear hands BLAS a row-major (in, out) operand, which
        the matrix-vector products of one-token decoding read up to 2x faster (the output layer most of all), and
        whose contiguous row blocks several threads share between them without a copy.
        With `pack`, each Linear also keeps a oneDNN-packed copy of its weight (see InferenceLinear for when it
        is used): speed for a second copy of the weights in memory. The feed-forward activation moves into its
        first Linear (one fused kernel). The packed copies serve products of up to `max_rows` rows (default
        InferenceLinear.MAX_ROWS; a server: its batch), larger ones MKL: oneDNN keeps a kernel per row count (see
        InferenceLinear). Prepare after loading the weights (the packed copies do not follow later changes); leave
        training models as they are.
        """
        if next(self.parameters()).device.type != "cpu":
            return self.eval()
        pack = pack and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
        for parent in list(self.modules()):
            for name, m in parent.named_children():
                if type(m) is nn.Linear and m.weight.dtype == torch.float32:
                    fuse = isinstance(parent, FeedForward) and name == "fc"  # fc runs the activation itself
                    setattr(parent, name, InferenceLinear(m, pack, parent.activation if fuse else None, max_rows))
                    if fuse:
                        parent.act = nn.Identity()
        return self.eval()

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # shared (tied) parameters count once
        if non_embedding and isinstance(self.embed.pos, LearnedPositionalEncoding):
            n -= self.embed.pos.weight.numel()
        return n

    def memory_bytes(self) -> int:
        """Bytes of parameters and buffers (tied weights counted once)."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
