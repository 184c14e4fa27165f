"""Export directories and ONNX Runtime sessions, shared by `python -m export` and the ONNX backend.

An export directory holds model.onnx + model.onnx.data (the graph and its weights), config.json (the model
config, as in a µLM checkpoint), the tokenizer files, verify_report.json and manifest.json (written last:
format, dtype, graph inputs/outputs, the verification report and the SHA-256 and size of every other file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from export.onnx_export import input_names, present_names
from ulm.config import GPTConfig
from ulm.data.dataset import file_sha256
from ulm.tokenizer import Tokenizer

FORMAT = "ulm-onnx/2"  # 2: the cache is a fixed-size buffer updated in place (1: concatenated)
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
REPORT_FILE = "verify_report.json"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
INT8_WEIGHT_BITS = 7  # int8 exports' weights use [-64, 64]: full-range ones overflow non-VNNI CPUs' products


class ExportError(ValueError):
    """An export directory is missing, incomplete or does not match its manifest."""


def read_export(directory: str | os.PathLike) -> tuple[dict, GPTConfig, Tokenizer]:
    """(manifest, model config, tokenizer) of an export directory; ExportError naming what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"export directory {d} does not exist")
    path = d / MANIFEST
    if not path.is_file():
        hint = " (a µLM checkpoint: run `python -m export` on it first)" if (d / "model.safetensors").is_file() else ""
        raise ExportError(f"{d} is not an ONNX export: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
        config = json.loads((d / CONFIG_FILE).read_text())
        cfg = GPTConfig.from_dict(config["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{d}: unreadable {MANIFEST} or {CONFIG_FILE}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r} (an export from an "
                          f"older µLM: run `python -m export` on its checkpoint again)")
    if manifest.get("dtype") == "int8" and manifest.get("quantization", {}).get("weight_bits") != INT8_WEIGHT_BITS:
        raise ExportError(f"{path}: an int8 export with 8-bit weights, which overflow ONNX Runtime's int8 products "
                          f"on CPUs without VNNI: run `python -m export --quantize int8` on its checkpoint again")
    for name, info in manifest.get("files", {}).items():  # sizes only: hashing GBs on every start is slow
        f = d / name
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            raise ExportError(f"{d}: {name} is missing or has the wrong size (truncated copy?)")
    return manifest, cfg, Tokenizer.load(d)


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

    spin: idle intra-op threads spin (ORT's default) rather than sleep. Measured with 2 threads on 2 cores
    (GPT-2-small): in-process, spinning decodes one row up to ~20% faster and 16 rows ~8%; in the server, whose
    event loop needs the same cores, sleeping threads halve the time to first token (45 -> 29 ms, one stream)
    for the same tokens/s at 16 streams."""
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
