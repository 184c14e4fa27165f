"""Checkpoints: a directory with model.safetensors, config.json and the tokenizer.

Each file is written to a temporary name and renamed into place, config.json last, so a directory with a
config.json holds a complete checkpoint. Loading reads tensors with safetensors: no pickle, no code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ulm.config import GPTConfig
from ulm.model import GPT, SinusoidalPositionalEncoding, sinusoidal_table
from ulm.tokenizer import Tokenizer, byte_level
from ulm.util import atomic_write_text, check_json_types, file_in, read_json_object

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "ulm-checkpoint/1"
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# config.json keys the tools read back (the addition task's: `ulm eval` rebuilds the task from them)
CONFIG_TYPES = {"model": dict, "name": str, "preset": str, "task": str, "dataset": str, "digits": int,
                "reverse": bool, "val_fraction": float, "test_fraction": float, "split_seed": int}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, truncated or does not match its config."""


def save_checkpoint(directory: str | os.PathLike, model: GPT, tokenizer: Tokenizer | None = None,
                    extra: dict | None = None) -> Path:
    """Write `model` (and its tokenizer, byte-level if none) to `directory`. `extra` goes into config.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_weights:
        state.pop("lm_head.weight", None)  # the same tensor as the token embedding
    tmp = d / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, d / WEIGHTS_FILE)
    (tokenizer or byte_level()).save(d)
    meta = {"format": FORMAT, "model_type": "gpt", "model": cfg.to_dict(), **(extra or {})}
    atomic_write_text(d / CONFIG_FILE, json.dumps(meta, indent=2))
    return d


def read_config(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    path = file_in(d, CONFIG_FILE, "checkpoint", CheckpointError, f"{d} is not a µLM checkpoint: no {CONFIG_FILE}")
    meta = read_json_object(path, CheckpointError)
    if meta.get("format") != FORMAT or meta.get("model_type") != "gpt":
        raise CheckpointError(f"{path} is not a µLM GPT checkpoint (format {meta.get('format')!r})")
    if "model" not in meta:
        raise CheckpointError(f"{path} has no 'model' config")
    check_json_types(meta, CONFIG_TYPES, path, CheckpointError)
    return meta


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer, dict]:
    """Load (model in eval mode, tokenizer, config.json contents); a clear CheckpointError on any mismatch."""
    d = Path(directory)
    meta = read_config(d)
    try:
        cfg = GPTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE} has an invalid model config: {e}") from e
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{d} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is unreadable (truncated or corrupt?): {e}") from e
    check_dtypes(state, str(weights))
    with torch.device("meta"):
        model = GPT(cfg)
    load_state(model, state, str(weights))
    tokenizer = Tokenizer.load_for_model(d, cfg.vocab_size, d / CONFIG_FILE, CheckpointError)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, meta


def check_dtypes(state: dict[str, torch.Tensor], source: str) -> None:
    """One floating dtype throughout: float64, integer or mixed weights fail only in the first forward pass."""
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1 or not dtypes <= set(WEIGHT_DTYPES):
        found = ", ".join(sorted(str(t).removeprefix("torch.") for t in dtypes))
        raise CheckpointError(f"{source}: tensors must all be float32, float16 or bfloat16, found {found}")


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into a model built on the meta device, checking names and shapes first."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_weights:
        model.lm_head.weight = model.embed.tok.weight
    # non-persistent buffers (sinusoidal tables) were built on the meta device: build them for real
    for module in model.modules():
        if isinstance(module, SinusoidalPositionalEncoding):
            module.table = sinusoidal_table(*module.table.shape)
