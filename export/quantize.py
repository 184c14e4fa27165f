"""Dynamic int8 quantization of an exported graph's MatMul weights (ONNX Runtime's quantize_dynamic).

Pre-processing first (quant_pre_process: symbolic shape inference and ORT's basic graph optimisations, which
fold constants such as the transposed tied output weight so its MatMul can be quantized too). Weights become
int8 with a float scale per tensor (or per output column with per_channel); activations are quantized at run
time, row by row. The embedding tables stay fp32 (they are gathered, not multiplied).

Weights use 7 bits of the int8 range (reduce_range): on x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernel
adds pairs of products in saturating int16, which full-range weights overflow; 7-bit ones cannot
(2 * 255 * 64 < 2**15), so an export is equally accurate on every host (docs/export.md has the measurements).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.onnx_export import quiet
from export.runtime import DATA_FILE, INT8_WEIGHT_BITS, MODEL_FILE

QUANT_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def quantize_int8(src: str | os.PathLike, out_dir: str | os.PathLike, per_channel: bool = False) -> Path:
    """Write out_dir/model.onnx (+ model.onnx.data): `src` with int8 MatMul weights. Returns its path."""
    out = Path(out_dir) / MODEL_FILE
    with tempfile.TemporaryDirectory(prefix="ulm-quant-") as tmp, quiet("onnxruntime"):
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), save_as_external_data=True, all_tensors_to_one_file=True,
                          external_data_location="pre.onnx.data")
        quantize_dynamic(pre, out, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                         reduce_range=INT8_WEIGHT_BITS == 7, weight_type=QuantType.QInt8, use_external_data_format=True)
    for f in (out, out.with_name(DATA_FILE)):
        f.chmod(0o644)  # the quantizer's temporary files are private
    return out


def matmul_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the constant weights (with their scales and zero points) that (integer) MatMuls read."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    transposed = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Transpose"}
    names: set[str] = set()
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm"):  # B may be a Transpose of a weight (a tied output layer)
            b = transposed.get(n.input[1], n.input[1])
            names.update(i for i in (b,) if i in inits or i in consts)
        elif n.op_type in QUANT_OPS:  # inputs: A, B, [a_scale/a_zero_point...], B's scale and zero point
            names.update(i for i in n.input[1:] if i in inits or i in consts)
    return sum(tensor_bytes(inits.get(n) or consts[n]) for n in names)


def tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def model_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    return p.stat().st_size + (p.with_name(DATA_FILE).stat().st_size if p.with_name(DATA_FILE).exists() else 0)
