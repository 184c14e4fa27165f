"""The export format and ONNX Runtime sessions: the one module of export/ that the server's ONNX backend reads.

An export directory holds model.onnx + model.onnx.data (the graph and its weights), config.json (the model
config, as in a µLM checkpoint), the tokenizer files, verify_report.json and manifest.json (written last:
format, dtype, graph inputs/outputs, the verification report and the SHA-256 and size of every other file).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil

from ulm.config import GPTConfig
from ulm.tokenizer import TOKENIZER_FILE, Tokenizer
from ulm.util import check_json_types, file_sha256, is_json_type, read_json_object

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights: one convention for every model size
FORMAT = "ulm-onnx/2"  # 2: the cache is a fixed-size buffer updated in place (1: concatenated)
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
REPORT_FILE = "verify_report.json"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DTYPES = ("float32", "int8")
REQUIRED_FILES = (MODEL_FILE, DATA_FILE, CONFIG_FILE, TOKENIZER_FILE)
MANIFEST_TYPES = {"name": str, "dtype": str, "quantization": dict, "files": dict, "num_params": int,
                  "inputs": list, "outputs": list}
INT8_WEIGHT_BITS = 7  # int8 exports' weights use [-64, 64]: full-range ones overflow non-VNNI CPUs' products


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "past_lengths", "logits_index", *past_names(n_layer)]


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class ExportError(ValueError):
    """An export directory is missing, incomplete or does not match its manifest."""


def read_export(directory: str | os.PathLike) -> tuple[dict, GPTConfig, Tokenizer]:
    """(manifest, model config, tokenizer) of an export directory; ExportError naming the file that is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"export directory {d} does not exist")
    path = d / MANIFEST
    if not path.is_file():
        hint = " (a µLM checkpoint: run `python -m export` on it first)" if (d / "model.safetensors").is_file() else ""
        raise ExportError(f"{d} is not an ONNX export: no {MANIFEST}{hint}")
    manifest = read_json_object(path, ExportError)
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r} (an export from an "
                          f"older µLM: run `python -m export` on its checkpoint again)")
    check_json_types(manifest, MANIFEST_TYPES, path, ExportError)
    if manifest.get("dtype", "float32") not in DTYPES:
        raise ExportError(f"{path}: dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    if manifest.get("dtype") == "int8" and manifest.get("quantization", {}).get("weight_bits") != INT8_WEIGHT_BITS:
        raise ExportError(f"{path}: an int8 export with 8-bit weights, which overflow ONNX Runtime's int8 products "
                          f"on CPUs without VNNI: run `python -m export --quantize int8` on its checkpoint again")
    check_sizes(d, manifest)
    cfg = read_model_config(d / CONFIG_FILE)
    for key, names in (("inputs", input_names(cfg.n_layer)), ("outputs", ["logits", *present_names(cfg.n_layer)])):
        if manifest.get(key, names) != names:
            raise ExportError(f"{path}: its {key} do not match {d / CONFIG_FILE} ({cfg.n_layer} layers)")
    check_graph(d / MODEL_FILE, cfg)
    tokenizer = Tokenizer.load_for_model(d, cfg.vocab_size, d / CONFIG_FILE, ExportError)
    return manifest, cfg, tokenizer


def check_sizes(d: Path, manifest: dict) -> None:
    """Every file the manifest lists is there at its size (hashing GBs on every start is slow), the graph among them."""
    path, files = d / MANIFEST, manifest.get("files")
    if files is None:
        raise ExportError(f"{path} lists no files")
    for name in REQUIRED_FILES:
        if name not in files:
            raise ExportError(f"{path} does not list {name}")
    for name, info in files.items():
        if Path(name).name != name or not isinstance(info, dict) or not is_json_type(info.get("bytes"), int):
            raise ExportError(f"{path}: bad entry for {name!r} in 'files' (a file name and its bytes)")
        f = d / name
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            raise ExportError(f"{d}: {name} is missing or has the wrong size (truncated copy?)")


def read_model_config(path: Path) -> GPTConfig:
    config = read_json_object(path, ExportError)
    check_json_types(config, {"model": dict}, path, ExportError)
    try:
        return GPTConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path} has an invalid model config: {e}") from e


def check_graph(path: Path, cfg: GPTConfig) -> None:
    """The graph's signature matches the config and its weights lie inside their file: a mismatch would surface
    only in ONNX Runtime's first call, as an error naming neither file."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError shares no base with OSError or ValueError
        raise ExportError(f"{path} is not an ONNX model: {e}") from e
    cache = ["batch", cfg.n_head, "cache_length", cfg.head_dim]
    want = {"logits": [cfg.vocab_size], **dict.fromkeys([*past_names(cfg.n_layer), *present_names(cfg.n_layer)], cache)}
    signature = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                 for v in [*graph.input, *graph.output]}
    if list(signature) != [*input_names(cfg.n_layer), "logits", *present_names(cfg.n_layer)] or any(
            signature[name][-len(dims):] != dims for name, dims in want.items()):
        raise ExportError(f"{path}: the graph's inputs and outputs do not match {path.with_name(CONFIG_FILE)}")
    data_size = path.with_name(DATA_FILE).stat().st_size
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in t.external_data}
        offset, length = int(where.get("offset", 0)), int(where.get("length", -1))
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if where.get("location") != DATA_FILE or length != math.prod(t.dims) * itemsize or offset + length > data_size:
            raise ExportError(f"{path}: weight {t.name} does not lie within {DATA_FILE} at its size (a mixed-up "
                              f"or truncated copy?)")


def file_entries(directory: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"sha256": file_sha256(directory / n), "bytes": (directory / n).stat().st_size} for n in names}


def check_files(directory: str | os.PathLike) -> None:
    """Re-hash every file against the manifest; ExportError on a mismatch."""
    d = Path(directory)
    manifest, _, _ = read_export(d)
    for name, info in manifest["files"].items():
        if file_sha256(d / name) != info["sha256"]:
            raise ExportError(f"{d}: {name} does not match the manifest's SHA-256")


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def create_session(path: str | os.PathLike | bytes, device: str = "cpu", threads: int | None = None,
                   spin: bool = True) -> ort.InferenceSession:
    """A session (of a model file, or a serialized model) with full graph optimisation, on CUDA when asked for and
    usable (ORT falls back to the CPU when the CUDA provider cannot start; `session.get_providers()` says what is in
    use).

    spin: idle intra-op threads spin (ORT's default) rather than sleep: faster in-process, but a server, whose
    event loop needs the same cores, is better off with sleeping ones (docs/performance-log.md)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3  # errors only: the CUDA provider's load failure is reported by our caller
    providers = [CUDA, CPU] if device == "cuda" and CUDA in ort.get_available_providers() else [CPU]
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)


def empty_cache(cfg: GPTConfig, batch: int, length: int) -> list[np.ndarray]:
    """A zeroed cache of `length` positions per row, as the graph takes it: 2 x n_layer (B, nh, L, hs)."""
    return [np.zeros((batch, cfg.n_head, length, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)]


def run(session: ort.InferenceSession, input_ids: np.ndarray, past_lengths: np.ndarray, logits_index: np.ndarray,
        cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call of the graph on numpy arrays: (logits (B, K, V), the updated cache, new arrays)."""
    n_layer = len(cache) // 2
    feeds = dict(zip(input_names(n_layer), [np.asarray(a, np.int64) for a in (input_ids, past_lengths, logits_index)]
                     + list(cache)))
    logits, *present = session.run(["logits", *present_names(n_layer)], feeds)
    return logits, present
