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
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from torch.export import Dim

from ulm.model import GPT, Block

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights: one convention for every model size
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask", "logits_index", *past_names(n_layer)]


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class OnnxGPT(nn.Module):
    """GPT forward over explicit past keys/values, built from the model's own modules (no copied weights)."""

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
        present: list[torch.Tensor] = []
        for i, block in enumerate(m.blocks):
            x = block_forward(block, x, past[2 * i], past[2 * i + 1], mask, present)
        x = torch.gather(x, 1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        return (m.lm_head(m.ln_f(x)), *present)


def block_forward(block: Block, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor,
                  present: list[torch.Tensor]) -> torch.Tensor:
    """Block.forward, with the attention's keys/values appended to the past (and to `present`)."""

    def attn(h: torch.Tensor) -> torch.Tensor:
        a = block.attn
        B, T, C = h.shape
        q, k, v = a.in_proj(h).split(C, dim=2)
        q, k, v = a.heads(q), a.heads(k), a.heads(v)  # (B, nh, T, hs)
        k = torch.cat([past_k, k], dim=2)  # (B, nh, P+T, hs)
        v = torch.cat([past_v, v], dim=2)
        present.extend((k, v))
        # Attention as plain matmuls, not SDPA: ONNX Runtime then folds the key transpose into the MatMul
        # instead of re-transposing the whole key cache every step (batch-16 decode ~20% faster).
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, nh, T, P+T)
        y = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v  # (B, nh, T, hs)
        return a.out_proj(y.transpose(1, 2).reshape(B, T, C))

    if block.norm_first:
        x = x + attn(block.ln_1(x))
        return x + block.mlp(block.ln_2(x))
    x = block.ln_1(x + attn(x))
    return block.ln_2(x + block.mlp(x))


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
