"""Inference backends by name. Each module is imported only when its backend is chosen."""
from __future__ import annotations

import importlib
from pathlib import Path

from server.backends.base import Backend

# name -> "module:class"; the class is constructed as cls(checkpoint_dir, device, max_batch, **options)
# (options: SERVING_OPTIONS inside the server, and quantize= for the backends in QUANTIZING)
BACKENDS: dict[str, str] = {
    "torch": "server.backends.torch_backend:TorchBackend",
    "onnx": "server.backends.onnx_backend:OnnxBackend",
}
# Options for a backend inside the server, where the event loop and gRPC's threads share the cores: ONNX
# Runtime's pool threads sleep when idle (see export.runtime.create_session: the first token comes sooner).
SERVING_OPTIONS: dict[str, dict] = {"onnx": {"spin": False}}
# Backends that quantize a checkpoint's weights as they load it (ONNX int8 is an export: python -m export)
QUANTIZING = ("torch",)


def load_backend(name: str, checkpoint_dir: str | Path, device: str = "cpu", max_batch: int = 32,
                 serving: bool = False, quantize: str | None = None) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if quantize is not None and name not in QUANTIZING:
        raise ValueError(f"--quantize is for the {', '.join(QUANTIZING)} backend; an int8 ONNX model is an export "
                         "(python -m export --quantize int8)")
    module_name, cls_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"backend {name!r} is not available: {e}") from e
    options = dict(SERVING_OPTIONS.get(name, {})) if serving else {}
    if quantize is not None:
        options["quantize"] = quantize
    return getattr(module, cls_name)(checkpoint_dir, device, max_batch, **options)
