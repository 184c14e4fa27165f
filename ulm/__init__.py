"""µLM: a from-scratch transformer library with datasets, training, generation.

The names below load on first use (PEP 562), so that a process that needs only a light module (the server's
tokenizer worker imports ulm.tokenizer) does not import torch."""
from __future__ import annotations

import importlib

_HOMES = {"GPT": "ulm.model", "GPTConfig": "ulm.config", "KVCache": "ulm.kv_cache", "Seq2SeqConfig": "ulm.config",
          "Transformer": "ulm.seq2seq", "gpt_preset": "ulm.config"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'ulm' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
