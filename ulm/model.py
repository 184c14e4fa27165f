"""The decoder-only GPT and the layers it is made of, from scratch in PyTorch.

Layers: LayerNorm, sinusoidal and learned positional encodings, MultiHeadAttention (self and cross, padding and
causal masks, an optional KV cache), FeedForward, Block (an encoder layer or a GPT block, pre- or post-norm),
Embedder. The encoder-decoder Transformer is in ulm.seq2seq, the KV cache in ulm.kv_cache, the CPU inference
layout in ulm.inference.

Inside a forward pass, modules call their children's .forward rather than the modules themselves: decoding a token
per row is bound by per-call costs, and nn.Module.__call__ costs more than a small layer's work.

Shapes: B batch, T query length, S key length, C = n_embd, nh heads, hs = C // nh head size,
L = cache length (context).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ulm.config import GPTConfig, Seq2SeqConfig
from ulm.kv_cache import KVCache, LayerCache, write_kv


class LayerNorm(nn.Module):
    """Layer normalization with an optional bias: what nn.LayerNorm(ndim, eps=eps, bias=bias) computes, with the
    same parameters and state_dict keys (weight, bias)."""

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
    """nn.Dropout, or nothing to do when p is 0. Layers call theirs in training only: in eval mode dropout is the
    identity, and a decode step would otherwise call one three times per layer."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over nh heads, for self- and cross-attention.

    q, k and v projections are packed in one (3C, C) weight, in nn.MultiheadAttention's layout, so that
    self-attention is a single matmul. Masks: `key_padding_mask` (B, S) is True at padding keys (as in
    nn.MultiheadAttention); `causal` hides future keys; `attn_mask` (B or 1, 1, T, S) is True where a
    query may attend (SDPA's convention; or an additive float mask) and overrides both. `cache` (a
    ulm.kv_cache.LayerCache, inference): this step's keys/values are written into it and the queries attend
    to its first `length` positions through `attn_mask` (None: each row's one new token sees them all).
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
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        if memory is None:  # (B, T, 3C) -> q, k, v (B, nh, T, hs): one view and permute for all three
            qkv = self.in_proj.forward(x).view(B, T, 3, self.n_head, C // self.n_head)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind()
            if cache is not None:
                k, v = write_kv(cache, k, v)  # (B, nh, length, hs)
        else:  # cross-attention: queries from x, keys and values from the encoder's output
            w_q, w_kv = self.in_proj.weight.split([C, 2 * C])
            b_q, b_kv = self.in_proj.bias.split([C, 2 * C]) if self.in_proj.bias is not None else (None, None)
            q = self.heads(F.linear(x, w_q, b_q))  # (B, nh, T, hs)
            k, v = map(self.heads, F.linear(memory, w_kv, b_kv).split(C, dim=2))  # (B, nh, S, hs)
        if attn_mask is None and cache is None:
            attn_mask = build_mask(key_padding_mask, causal, T, k.shape[2], x.device)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )  # (B, nh, T, hs)
        return self.out_proj.forward(y.transpose(1, 2).reshape(B, T, C))

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, S, C = t.shape
        return t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2)


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
        self.act = activation_layer(activation)  # ulm.inference.prepare_for_inference may fuse it into fc
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = activation
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act.forward(self.fc.forward(x))  # (B, T, d_ff)
        return self.proj.forward(self.dropout(h) if self.training else h)  # (B, T, C)


class Block(nn.Module):
    """Self-attention + feed-forward with residual connections: an encoder layer, or a GPT block.

    Pre-norm: x + f(norm(x)). Post-norm (the original paper): norm(x + f(x)). The one formula of both the full
    pass and the cached decode step (export.onnx_export.block_forward is its ONNX Runtime form).
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

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, causal: bool = False,
                attn_mask: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the masks and `cache` go to the self-attention (see MultiHeadAttention)."""
        h = self.ln_1.forward(x) if self.norm_first else x
        y = self.attn.forward(h, key_padding_mask=key_padding_mask, causal=causal, attn_mask=attn_mask, cache=cache)
        y = self.dropout(y) if self.training else y
        if self.norm_first:
            x = x + y
            y = self.mlp.forward(self.ln_2.forward(x))
            return x + (self.dropout(y) if self.training else y)
        x = self.ln_1.forward(x + y)
        y = self.mlp.forward(x)
        return self.ln_2.forward(x + (self.dropout(y) if self.training else y))


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
        x = self.tok.forward(idx)
        if self.scale != 1.0:  # no multiply by 1 on every decode step
            x = x * self.scale
        x = x + self.pos.forward(pos)  # (B, T, C)
        return self.dropout(x) if self.training else x


def block_stack(cfg: GPTConfig | Seq2SeqConfig, n: int) -> nn.ModuleList:
    """n Blocks of a config's shape: a GPT's, or an encoder's."""
    return nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.d_ff, activation=cfg.activation, bias=cfg.bias,
                               dropout=cfg.dropout, norm_first=cfg.norm_first, eps=cfg.layer_norm_eps)
                         for _ in range(n))


def final_norm(cfg: GPTConfig | Seq2SeqConfig) -> nn.Module:
    """Pre-norm stacks end with a norm; post-norm layers already end with one."""
    return LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()


class GPT(nn.Module):
    """Decoder-only language model (GPT-2 architecture by default)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedder(cfg.vocab_size, cfg.n_embd, cfg.block_size, cfg.pos_encoding, cfg.dropout)
        self.blocks = block_stack(cfg, cfg.n_layer)
        self.ln_f = final_norm(cfg)
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

        Without a cache: a causal pass over positions 0..T-1. With a cache (inference, in eval mode): idx holds
        each row's next tokens at positions input_pos (B, T); their keys/values are written into `kv_cache` rows
        `rows`, and each query attends to its row's cached positions up to its own. `logits_at` (B,) picks one
        position per row, so the output layer runs once per row: logits (B, 1, V).
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
        x = self.embed.forward(idx, input_pos)  # (B, T, C)
        if kv_cache is None:
            mask, layers = None, [None] * len(self.blocks)
        else:
            mask = kv_cache.attention_mask(input_pos, length, x.dtype)  # (B, 1, T, length), once for every layer
            layers = kv_cache.layers(rows, input_pos, length, mask is None)
        causal = kv_cache is None
        for block, cache in zip(self.blocks, layers):
            x = block.forward(x, causal=causal, attn_mask=mask, cache=cache)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        return self.lm_head.forward(self.ln_f.forward(x))

    def decode_step(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_cache: KVCache, rows: slice) -> torch.Tensor:
        """idx, input_pos (B, 1) -> next-token logits (B, V): one token per row of `rows`, written into the cache at
        its position, attending over all max_len cached positions with the ones after it masked. forward's cached
        step reads the longest row's length on the host; here shapes depend on B alone and nothing goes to the host,
        so that a CUDA graph can capture the step (server.backends.cuda_graphs). The masked positions make it cost
        more than forward's on a CPU."""
        L = kv_cache.max_len
        x = self.embed.forward(idx, input_pos)  # (B, 1, C)
        mask = kv_cache.causal_rows(input_pos, L, x.dtype)  # (B, 1, 1, L)
        for block, cache in zip(self.blocks, kv_cache.layers(rows, input_pos, L, at_end=False)):
            x = block.forward(x, attn_mask=mask, cache=cache)
        return self.lm_head.forward(self.ln_f.forward(x))[:, -1]  # (B, V)

    def prepare_for_inference(self, pack: bool = True, max_rows: int | None = None,
                              quantize: str | None = None) -> GPT:
        """ulm.inference.prepare_for_inference: Linear layouts and kernels (int8 with quantize="int8") for
        decoding on the CPU."""
        from ulm.inference import prepare_for_inference  # it builds on this module's layers

        return prepare_for_inference(self, pack, max_rows, quantize)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # shared (tied) parameters count once
        if non_embedding and isinstance(self.embed.pos, LearnedPositionalEncoding):
            n -= self.embed.pos.weight.numel()
        return n

    def memory_bytes(self) -> int:
        """Bytes of parameters and buffers (tied weights counted once)."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))
