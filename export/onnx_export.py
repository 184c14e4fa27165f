"""Checkpoint -> ONNX: one graph for the GPT with its KV cache as explicit inputs and outputs.

Graph signature (B batch, T new tokens, P past length, K positions with logits, V vocabulary, nh heads,
hs head size):
  inputs   input_ids (B, T) int64, position_ids (B, T) int64, attention_mask (B, P+T) int64 (1 = real token),
           logits_index (B, K) int64 (which of the T positions get logits),
           past_key_values.{i}.key / .value (B, nh, P, hs) float32; P may be 0 (the first step)
  outputs  logits (B, K, V) float32, present.{i}.key / .value (B, nh, P+T, hs) = concat(past, new)
Rows of a batch may hold sequences of different lengths: pad the past anywhere with attention_mask 0 and give
each token its real position in position_ids. logits_index is GPT.forward's `logits_at`: a prefill asks for its
last position only and skips a (T, C) x (C, V) matmul; pass arange(T) for every position.

The graph holds ONNX Runtime's fused operators (domain com.microsoft: MultiHeadAttention,
SkipLayerNormalization), so it runs on ONNX Runtime (CPU or CUDA provider), not on any ONNX runtime.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from ulm.model import GPT, Block

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights: one convention for every model size
DEFAULT_OPSET = 20  # GELU is one Gelu node (opset 18 spells it out in 8), which ORT fuses with its bias
MIN_OPSET = 17  # LayerNormalization


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask", "logits_index", *past_names(n_layer)]


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class OnnxGPT(nn.Module):
    """GPT forward over explicit past keys/values, built from the model's own modules (no copied weights).

    Attention and each residual Add + LayerNorm are ONNX Runtime's fused operators (see ort_op): export only,
    in eager mode their outputs are placeholders.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                logits_index: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        B, T = input_ids.shape
        S = attention_mask.shape[1]  # P + T
        x = m.embed(input_ids, position_ids)  # (B, T, C)
        # Query t sits at index S - T + t: it sees real keys up to itself, and always itself, so a padding
        # query never has an empty row (its NaNs would reach real rows through the next layer's keys).
        key_idx = torch.arange(S, device=input_ids.device)
        query_idx = torch.arange(S - T, S, device=input_ids.device)[:, None]  # (T, 1)
        real = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        mask = (key_idx <= query_idx) & (real | (key_idx == query_idx))  # (B, 1, T, S)
        # Additive, built once for every layer. Finite, as transformers' masks: a fused GPU kernel that keeps a
        # running row maximum must never compute -inf - (-inf).
        attn_bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        present: list[torch.Tensor] = []
        blocks = m.blocks
        h = blocks[0].ln_1(x) if blocks[0].norm_first else x
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else m.ln_f
            h, x = block_forward(block, h, x, next_ln, past[2 * i], past[2 * i + 1], attn_bias, present)
        h = torch.gather(h, 1, logits_index[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, K, C)
        return (m.lm_head(h), *present)


def block_forward(block: Block, h: torch.Tensor, x: torch.Tensor, next_ln: nn.Module, past_k: torch.Tensor,
                  past_v: torch.Tensor, attn_bias: torch.Tensor, present: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block.forward on the residual stream x, the attention's keys/values appended to the past (and to
    `present`); returns (h, x) for the next block.

    Pre-norm: h = ln_1(x) comes in, (next_ln(x'), x') goes out, next_ln being the next block's ln_1 or ln_f:
    a residual Add, the bias before it and the LayerNorm after it are one SkipLayerNormalization (ORT fuses
    Add + LayerNormalization itself only where the LayerNorm is the sum's one reader: never in a residual stream).
    Post-norm: h is x.
    """
    a, mlp = block.attn, block.mlp

    def attn(h: torch.Tensor) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = F.linear(h, a.in_proj.weight).split(C, dim=2)  # its bias is added in the attention node
        kv_shape = (B, a.n_head, past_k.shape[2] + T, C // a.n_head)
        # Concat with the past, scaled q k^T + attn_bias, softmax, @ v and the head transposes: one node
        y, k, v = ort_op("MultiHeadAttention", [q, k, v, a.in_proj.bias, None, attn_bias, past_k, past_v],
                         {"num_heads": a.n_head}, [h.shape, kv_shape, kv_shape])
        present.extend((k, v))
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


def ort_op(name: str, inputs: list[torch.Tensor | None], attrs: dict, shapes: list) -> list[torch.Tensor]:
    """A node of ONNX Runtime's contrib operators (com.microsoft, CPU and CUDA kernels) with float32 outputs of
    these shapes. Used where ORT's graph optimizer does not fuse what the exporter writes (the attention with
    its past and padding mask, the pre-norm residual stream); None skips an optional input."""
    return torch.onnx.ops.symbolic_multi_out(f"com.microsoft::{name}", inputs, attrs,
                                             dtypes=[torch.float32] * len(shapes), shapes=shapes, version=1)


def example_inputs(model: GPT, batch: int = 2, past: int = 3, new: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with. Every dynamic size is >= 2, so torch.export specialises none of them."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    pos = torch.arange(past, past + new).expand(batch, new).contiguous()
    mask = torch.ones(batch, past + new, dtype=torch.long)
    logits_index = torch.arange(new).expand(batch, new).contiguous()
    kv = [torch.zeros(batch, cfg.n_head, past, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    return (ids, pos, mask, logits_index, *kv)


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization), got {opset}")


def export_onnx(model: GPT, out_dir: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write out_dir/model.onnx (+ model.onnx.data) for `model` (fp32, CPU); returns the model's path."""
    check_opset(opset)
    model = model.float().cpu().eval()
    n_layer = model.config.n_layer
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic_shapes = (
        {0: batch, 1: seq}, {0: batch, 1: seq},
        {0: batch, 1: Dim.AUTO},  # = past_sequence + sequence; torch.export infers the relation
        {0: batch, 1: Dim("num_logits")},
        tuple({0: batch, 2: past} for _ in range(2 * n_layer)),
    )
    path = Path(out_dir) / MODEL_FILE
    with torch.no_grad(), warnings.catch_warnings(), quiet("torch.onnx"):
        warnings.simplefilter("ignore")  # axis-renaming and deprecation notes from the exporter
        program = torch.onnx.export(
            OnnxGPT(model), example_inputs(model), dynamo=True, opset_version=opset,
            input_names=input_names(n_layer), output_names=["logits", *present_names(n_layer)],
            dynamic_shapes=dynamic_shapes, optimize=True,
        )
        program.save(path, external_data=True)
    name_total_axis(path)
    return path


def name_total_axis(path: Path) -> None:
    """Give the inferred P+T axis (attention_mask's, present's) one readable name in the saved graph."""
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    auto = g.input[2].type.tensor_type.shape.dim[1].dim_param
    named = next(d.dim_param for d in g.output[1].type.tensor_type.shape.dim if "+" in d.dim_param)
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in (auto, named):
                d.dim_param = "total_sequence"
    onnx.save(m, str(path))  # the weights stay in model.onnx.data, referenced by name


class quiet:
    """Raise a logger's level for a block (the exporter warns about optional packages it does not need)."""

    def __init__(self, name: str, level: int = logging.ERROR):
        self.logger, self.level = logging.getLogger(name), level

    def __enter__(self):
        self.old = self.logger.level
        self.logger.setLevel(self.level)

    def __exit__(self, *exc):
        self.logger.setLevel(self.old)
