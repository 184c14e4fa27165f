"""µLM: a from-scratch transformer library with datasets, training, generation."""
from ulm.config import GPTConfig, Seq2SeqConfig, gpt_preset
from ulm.kv_cache import KVCache
from ulm.model import GPT
from ulm.seq2seq import Transformer

__all__ = ["GPT", "GPTConfig", "KVCache", "Seq2SeqConfig", "Transformer", "gpt_preset"]
