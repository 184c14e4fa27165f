"""Import an HF-layout GPT-2 directory (config.json, model.safetensors, tokenizer files) as a µLM checkpoint."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ulm.checkpoint import CheckpointError, load_state, save_checkpoint
from ulm.config import GPTConfig
from ulm.model import GPT
from ulm.tokenizer import Tokenizer, byte_level

ENDOFTEXT = "<|endoftext|>"
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
RENAMES = {  # HF GPT-2 name suffix -> µLM name suffix, inside block i
    "ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.in_proj", "attn.c_proj": "attn.out_proj",
    "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
}


def config_from_hf(hf: dict) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"unsupported GPT-2 activation_function {act!r}")
    # attention variants µLM does not implement would load without error and give different outputs
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise CheckpointError("unsupported GPT-2 attention scaling (scale_attn_weights=false or "
                              "scale_attn_by_inverse_layer_idx=true)")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], d_ff=hf.get("n_inner") or 0, activation=ACTIVATIONS[act],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, norm_first=True, pos_encoding="learned",
            tie_weights=hf.get("tie_word_embeddings", True),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid GPT-2 config.json: {type(e).__name__}: {e}") from e


def convert_state(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel / GPT2Model names -> µLM GPT names; Conv1D weights (in, out) are transposed."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf_state.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old exports
            continue
        if name == "lm_head.weight":
            if not cfg.tie_weights:
                out[name] = t
            continue
        if name.startswith("h."):
            _, i, rest = name.split(".", 2)
            stem, kind = rest.rsplit(".", 1)
            if stem not in RENAMES:
                raise CheckpointError(f"unexpected GPT-2 tensor {name}")
            if rest in CONV1D:
                t = t.t()
            out[f"blocks.{i}.{RENAMES[stem]}.{kind}"] = t.contiguous()
        else:
            simple = {"wte.weight": "embed.tok.weight", "wpe.weight": "embed.pos.weight",
                      "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
            if name not in simple:
                raise CheckpointError(f"unexpected GPT-2 tensor {name}")
            out[simple[name]] = t
    return out


def load_gpt2(src: str | os.PathLike) -> GPT:
    d = Path(src)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise CheckpointError(f"{d} is not an HF GPT-2 directory: it needs config.json and model.safetensors")
    try:
        hf_cfg = json.loads((d / "config.json").read_bytes())
    except ValueError as e:  # bad JSON or not UTF-8
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON: {e}") from e
    if not isinstance(hf_cfg, dict):
        raise CheckpointError(f"{d / 'config.json'} must hold a JSON object")
    if hf_cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{d} holds a {hf_cfg.get('model_type')!r} model, not gpt2")
    cfg = config_from_hf(hf_cfg)
    try:
        hf_state = load_file(str(d / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{d / 'model.safetensors'} is unreadable: {e}") from e
    with torch.device("meta"):
        model = GPT(cfg)
    load_state(model, convert_state(hf_state, cfg), str(d / "model.safetensors"))
    return model.eval()


def load_gpt2_tokenizer(src: str | os.PathLike) -> Tokenizer | None:
    """GPT-2's byte-level BPE from tokenizer.json or vocab.json + merges.txt; None when neither is there."""
    d = Path(src)
    if (d / "tokenizer.json").is_file():
        hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        hf = HFTokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
    else:
        return None
    if hf.token_to_id(ENDOFTEXT) is None:
        hf.add_special_tokens([ENDOFTEXT])
    # GPT-2 was trained without a BOS; <|endoftext|> separates documents and ends them.
    return Tokenizer(hf, bos=ENDOFTEXT, eos=ENDOFTEXT, pad=None, add_bos=False, kind="gpt2-bpe")


def import_gpt2(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    model = load_gpt2(src)
    tokenizer = load_gpt2_tokenizer(src)
    if tokenizer is None:
        print(f"warning: no tokenizer files in {src}; using the byte-level tokenizer", file=sys.stderr)
        tokenizer = byte_level()
    return save_checkpoint(out, model, tokenizer, extra={"source": f"gpt2:{Path(src).name}"})
