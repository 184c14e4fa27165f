"""Checkpoint -> ONNX: one graph for the GPT with its KV cache as explicit inputs and outputs.

Graph signature (B batch, T new tokens, L cache length, K positions with logits, V vocabulary, nh heads,
hs head size):
  inputs   input_ids (B, T) int64, past_lengths (B,) int64 (positions each row's cache already holds),
           logits_index (B, K) int64 (which of the T positions get logits),
           past_key_values.{i}.key / .value (B, nh, L, hs) float32: the cache, a fixed-size buffer
  outputs  logits (B, K, V) float32, present.{i}.key / .value (B, nh, L, hs): the cache with the new keys/values
           written at positions past_lengths[b] + t (ONNX's TensorScatter, opset 24)
A row's cache holds its tokens from position 0 on, without holes; the new tokens take the positions after them
(their position ids too), and each token attends to the positions up to its own. So rows of a batch may hold
sequences of different lengths, and what lies beyond a row's length is never read (it must be finite: masked
keys' values still meet a zero weight). L >= past_lengths[b] + T. Bind each present to its past's buffer and
the cache is updated in place: a step copies nothing but the new tokens' keys/values (ORT's kernel skips the
copy when the buffers are one). logits_index is GPT.forward's `logits_at`: a prefill asks for its last position only
and skips a (T, C) x (C, V) matmul; pass arange(T) for every position.

The graph holds ONNX Runtime's fused operators (domain com.microsoft: MultiHeadAttention,
SkipLayerNormalization), so it runs on ONNX Runtime (CPU or CUDA provider), not on any ONNX runtime.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from export.runtime import MODEL_FILE, input_names, present_names
from ulm.model import GPT, Block

DEFAULT_OPSET = 24
MIN_OPSET = 24  # TensorScatter (24); Gelu as one node (20), which ORT fuses with its bias


class OnnxGPT(nn.Module):
    """GPT forward over explicit past keys/values, built from the model's own modules (no copied weights).

    Attention and each residual Add + LayerNorm are ONNX Runtime's fused operators (see ort_op): export only,
    in eager mode their outputs are placeholders.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past_lengths: torch.Tensor, logits_index: torch.Tensor,
                *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        B, T = input_ids.shape
        position_ids = past_lengths[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
        x = m.embed(input_ids, position_ids)  # (B, T, C)
        # A query sees the positions up to its own (a row has no holes): never an empty row, even for padding
        key_idx = torch.arange(cache[0].shape[2], device=input_ids.device)  # (L,)
        mask = key_idx <= position_ids[:, None, :, None]  # (B, 1, T, L)
        # Additive, built once for every layer. Finite, as transformers' masks: a fused GPU kernel that keeps a
        # running row maximum must never compute -inf - (-inf).
        attn_bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        present: list[torch.Tensor] = []
        blocks = m.blocks
        h = blocks[0].ln_1(x) if blocks[0].norm_first else x
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else m.ln_f
            h, x = block_forward(block, h, x, next_ln, cache[2 * i], cache[2 * i + 1], past_lengths, attn_bias,
                                 present)
        h = torch.gather(h, 1, logits_index[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, K, C)
        return (m.lm_head(h), *present)


# Block.forward as ORT's fused nodes (SkipLayerNormalization, TensorScatter); test_export's parity tests keep them equal
def block_forward(block: Block, h: torch.Tensor, x: torch.Tensor, next_ln: nn.Module, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, past_lengths: torch.Tensor, attn_bias: torch.Tensor,
                  present: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block.forward on the residual stream x, the attention's keys/values written into the cache (and the
    cache appended to `present`); returns (h, x) for the next block.

    Pre-norm: h = ln_1(x) comes in, (next_ln(x'), x') goes out, next_ln being the next block's ln_1 or ln_f:
    a residual Add, the bias before it and the LayerNorm after it are one SkipLayerNormalization (ORT fuses
    Add + LayerNormalization itself only where the LayerNorm is the sum's one reader: never in a residual stream).
    Post-norm: h is x.
    """
    a, mlp = block.attn, block.mlp

    def attn(h: torch.Tensor) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = a.in_proj(h).split(C, dim=2)
        k, v = (t.view(B, T, a.n_head, C // a.n_head).transpose(1, 2) for t in (k, v))  # (B, nh, T, hs)
        k, v = tensor_scatter(cache_k, k, past_lengths), tensor_scatter(cache_v, v, past_lengths)  # (B, nh, L, hs)
        present.extend((k, v))
        # scaled q k^T over the cache + attn_bias, softmax, @ v and the head transposes: one node
        y = ort_op("MultiHeadAttention", [q, k, v, None, None, attn_bias], {"num_heads": a.n_head}, [h.shape])[0]
        return F.linear(y, a.out_proj.weight)

    def ff(h: torch.Tensor) -> torch.Tensor:  # ORT fuses fc's bias into the Gelu (opset >= 20) or the int8 MatMul
        return F.linear(mlp.act(mlp.fc(h)), mlp.proj.weight)

    if block.norm_first:
        h, x = skip_layer_norm(attn(h), x, a.out_proj.bias, block.ln_2)
        return skip_layer_norm(ff(h), x, mlp.proj.bias, next_ln)
    x = skip_layer_norm(attn(x), x, a.out_proj.bias, block.ln_1)[0]
    x = skip_layer_norm(ff(x), x, mlp.proj.bias, block.ln_2)[0]
    return x, x


def skip_layer_norm(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, ln: nn.Module
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln(s), s) for s = x + y + bias."""
    stats = (*x.shape[:-1], 1)  # mean and 1/std: outputs 1 and 2, which the CPU kernel does not write
    out, _, _, s = ort_op("SkipLayerNormalization", [y, x, ln.weight, ln.bias, bias], {"epsilon": ln.eps},
                          [x.shape, stats, stats, x.shape])
    return out, s


def tensor_scatter(cache: torch.Tensor, update: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """ONNX's TensorScatter: `cache` (B, nh, L, hs) with row b's positions at[b] .. at[b] + T - 1 replaced by
    `update` (B, nh, T, hs). Export only."""
    return torch.onnx.ops.symbolic("::TensorScatter", [cache, update, at], {"axis": 2}, dtype=cache.dtype,
                                   shape=cache.shape, version=24)


def ort_op(name: str, inputs: list[torch.Tensor | None], attrs: dict, shapes: list) -> list[torch.Tensor]:
    """A node of ONNX Runtime's contrib operators (com.microsoft, CPU and CUDA kernels) with float32 outputs of
    these shapes. Used where ORT's graph optimizer does not fuse what the exporter writes (the attention with
    its past and padding mask, the pre-norm residual stream); None skips an optional input."""
    return torch.onnx.ops.symbolic_multi_out(f"com.microsoft::{name}", inputs, attrs,
                                             dtypes=[torch.float32] * len(shapes), shapes=shapes, version=1)


def example_inputs(model: GPT, batch: int = 2, new: int = 4, cache: int = 9) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with. Every dynamic size is >= 2 and they differ, so torch.export specialises none."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    past_lengths = torch.arange(batch) + 1
    logits_index = torch.arange(new).expand(batch, new).contiguous()
    kv = [torch.zeros(batch, cfg.n_head, cache, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    return (ids, past_lengths, logits_index, *kv)


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (TensorScatter), got {opset}")


def export_onnx(model: GPT, out_dir: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write out_dir/model.onnx (+ model.onnx.data) for `model` (fp32, CPU); returns the model's path."""
    check_opset(opset)
    model = model.float().cpu().eval()
    n_layer = model.config.n_layer
    batch, cache = Dim("batch"), Dim("cache_length")
    dynamic_shapes = ({0: batch, 1: Dim("sequence")}, {0: batch}, {0: batch, 1: Dim("num_logits")},
                      tuple({0: batch, 2: cache} for _ in range(2 * n_layer)))
    path = Path(out_dir) / MODEL_FILE
    with torch.no_grad(), warnings.catch_warnings(), quiet("torch.onnx"):
        warnings.simplefilter("ignore")  # axis-renaming and deprecation notes from the exporter
        program = torch.onnx.export(
            OnnxGPT(model), example_inputs(model), dynamo=True, opset_version=opset,
            input_names=input_names(n_layer), output_names=["logits", *present_names(n_layer)],
            dynamic_shapes=dynamic_shapes, optimize=True,
        )
        program.save(path, external_data=True)
    return path


class quiet:
    """Raise a logger's level for a block (the exporter warns about optional packages it does not need)."""

    def __init__(self, name: str, level: int = logging.ERROR):
        self.logger, self.level = logging.getLogger(name), level

    def __enter__(self):
        self.old = self.logger.level
        self.logger.setLevel(self.level)

    def __exit__(self, *exc):
        self.logger.setLevel(self.old)
