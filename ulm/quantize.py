"""Reduced-precision inference: int8 weights through torch's dynamic int8 Linear (FBGEMM, CPU), or the whole model in
bf16 where the processor computes in bf16 natively (oneDNN's AVX-512 BF16 or AMX kernels; a GPU with bf16).

bf16 (`quantize="bf16"`) casts every parameter, and so the KV cache, to bfloat16: a step reads half the fp32
bytes, products run in oneDNN's bf16 kernels with fp32 accumulation, and the logits come back as fp32. A CPU without
native bf16 (AVX2 only, such as Zen 3) would emulate it slower than fp32, so it is refused there.

quantize_for_inference swaps a model's fp32 nn.Linear layers for torch.ao.nn.quantized.dynamic.Linear: each weight
is quantized once, per output channel (symmetric, int8) and packed for FBGEMM; each product quantizes its input
on the fly (per tensor, uint8) and returns fp32. A decode step reads a quarter of the fp32 weight bytes.

Saturation on AVX2 hosts without VNNI: the u8 x s8 kernel (vpmaddubsw) adds pairs of products into int16, which
saturates when both activations of a pair are large (2 * 255 * 127 > 32767; ONNX Runtime's u8s8 kernels have the
same trap, docs/export.md). torch's dynamic Linear (version 4, the current one) passes reduce_range=True on the
x86/FBGEMM engines: activations are quantized to 7 bits (0..127), so a pair sums to at most 2 * 127 * 128 = 32512
and nothing saturates on any x86 host, for half a bit of activation precision.

The tied embedding and lm_head: the token table stays an fp32 Parameter of the embedding (a step gathers one row of
it); lm_head gets its own int8 copy (the largest product of a GPT-2-small step: quantizing it took a pass of the
49 products from ~18 to ~7 ms on the benchmark host). The feed-forward activation stays a module of its own
(torch's dynamic Linear fuses only ReLU).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

QUANTIZE_CHOICES = ("int8", "bf16")
ENGINES = ("x86", "fbgemm")  # torch's quantized engines whose dynamic Linear runs on FBGEMM


def check_quantize(quantize: str | None, device: str = "cpu") -> None:
    """ValueError (one line) unless `quantize` is None or a choice this host and device can run."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize == "bf16":
        check_bf16(device)
        return
    if device != "cpu":
        raise ValueError(f"--quantize {quantize} is for the CPU (FBGEMM), not {device}")
    if not any(e in torch.backends.quantized.supported_engines for e in ENGINES):
        raise ValueError(f"--quantize {quantize} needs torch's FBGEMM engine (x86), which this build lacks")


def check_bf16(device: str) -> None:
    if device == "cuda":
        if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
            raise ValueError("--quantize bf16 needs a GPU that computes in bf16, and torch sees none")
    elif not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("--quantize bf16 needs a CPU that computes in bf16 (AVX-512 BF16 or AMX); this one would "
                         "emulate it, slower than fp32: use --quantize int8")


def use_fbgemm() -> None:
    """Leave torch's quantized engine on x86 or fbgemm (both run dynamic Linear on FBGEMM); else pick one."""
    if torch.backends.quantized.engine not in ENGINES:
        torch.backends.quantized.engine = next(e for e in ENGINES if e in torch.backends.quantized.supported_engines)


class Int8Linear(DynamicLinear):
    """torch's dynamic int8 Linear, with the op called directly (no Python checks per call: decoding makes
    thousands of small calls) and reduce_range always on (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic.default(x, self._packed_params._packed_params, True)


def int8_linear(linear: nn.Linear) -> Int8Linear:
    """An Int8Linear of an fp32 nn.Linear: weights quantized per output channel, bias kept in fp32."""
    linear.qconfig = per_channel_dynamic_qconfig
    try:
        with warnings.catch_warnings():  # torch 2.13 marks quantize_per_channel deprecated (its successor: torchao)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
            q = Int8Linear.from_float(linear)
    finally:
        del linear.qconfig
    return q


@torch.no_grad()
def quantize_for_inference(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """int8: swap every fp32 nn.Linear of a CPU model for an Int8Linear; bf16: cast the model to bf16 (see the
    module docstring). Returns it in eval mode. Tied tables stay fp32 where they are also embeddings. Call before
    ulm.inference.prepare_for_inference (which then lays out whatever fp32 Linear is left) and after loading the
    weights; the quantized model does not train."""
    check_quantize(quantize, next(model.parameters()).device.type)
    if quantize == "bf16":
        return model.to(torch.bfloat16).eval()
    use_fbgemm()
    for parent in list(model.modules()):
        for name, m in parent.named_children():
            if type(m) is nn.Linear and m.weight.dtype == torch.float32:
                setattr(parent, name, int8_linear(m))
    return model.eval()


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the int8 weights (with their per-channel scales) of a quantized model's Linear layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, DynamicLinear):
            w = m.weight()
            n += w.numel() + 8 * w.shape[0]  # int8 values; a scale (fp64) per output channel (zero points: 0)
    return n
