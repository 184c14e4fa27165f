"""Model configurations (dataclasses), their one type check, and the named model shapes (GPT_PRESETS), from a
~100k-parameter toy to ~1 GB of fp32."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
POS_ENCODINGS = ("learned", "sinusoidal")


@dataclass
class GPTConfig:
    """A decoder-only language model. Defaults are GPT-2 small's architecture."""

    vocab_size: int = 50257
    block_size: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    d_ff: int = 0  # 0 = 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu_tanh"  # GPT-2 uses the tanh approximation
    norm_first: bool = True  # pre-norm (GPT-2) or post-norm (the original paper)
    pos_encoding: str = "learned"
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_fields(self)
        validate_common(self.n_embd, self.n_head, self.activation, self.pos_encoding)
        for name in ("vocab_size", "block_size", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return cls(**filter_fields(cls, d))


@dataclass
class Seq2SeqConfig:
    """An encoder-decoder Transformer ("Attention Is All You Need"). Defaults are the paper's base model."""

    src_vocab_size: int = 32000
    tgt_vocab_size: int = 32000
    block_size: int = 512
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    d_ff: int = 2048
    dropout: float = 0.1
    bias: bool = True
    activation: str = "relu"
    norm_first: bool = False
    pos_encoding: str = "sinusoidal"
    tie_weights: bool = False  # ties the decoder embedding and the output layer
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_fields(self)
        validate_common(self.n_embd, self.n_head, self.activation, self.pos_encoding)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Seq2SeqConfig:
        return cls(**filter_fields(cls, d))


def validate_common(n_embd: int, n_head: int, activation: str, pos_encoding: str) -> None:
    if n_head <= 0 or n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if pos_encoding not in POS_ENCODINGS:
        raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {pos_encoding!r}")


FIELD_TYPES = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}


def field_types(*classes) -> dict[str, str]:
    """Field name -> type name ("int", "float", ...) of dataclasses (their annotations are strings here)."""
    return {f.name: f.type for cls in classes for f in dataclasses.fields(cls)}


def check_types(values: dict, types: dict[str, str], source: str = "") -> dict:
    """`values` with every number a plain int or float (numpy scalars would not survive json.dumps); ValueError
    naming `source` and the key when a key is not in `types` or its value is not of the type named there."""
    prefix = f"{source}: " if source else ""
    out = {}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"{prefix}unknown key {key!r} (known: {', '.join(sorted(types))})")
        want = types[key]
        if not isinstance(value, FIELD_TYPES[want]) or (want != "bool" and isinstance(value, bool)):
            raise ValueError(f"{prefix}{key} must be {want}, got {value!r}")
        out[key] = int(value) if want == "int" else float(value) if want == "float" else value
    return out


def check_fields(cfg) -> None:
    """check_types on a config dataclass, in place: configs come from JSON too."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for name, value in check_types(values, field_types(type(cfg))).items():
        setattr(cfg, name, value)


def filter_fields(cls, d: dict) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__} must be a dict (JSON object), got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return dict(d)


# Model shapes, the one place model sizes are stated (`ulm init --preset NAME`; a recipe's `model = NAME`).
# vocab_size is the tokenizer's; shapes that name none take the byte-level one (259).
BYTE_VOCAB = 259  # 256 bytes + BOS/EOS/PAD
GPT_PRESETS: dict[str, dict] = {
    # n-digit addition (ulm.addition): the char tokenizer of "0123456789+=" (271); context for up to 9 digits
    "adder": dict(vocab_size=271, block_size=32, n_layer=2, n_head=4, n_embd=64, activation="gelu"),  # ~0.12M
    "toy": dict(vocab_size=BYTE_VOCAB, block_size=128, n_layer=2, n_head=2, n_embd=64),  # ~0.12M
    "tiny": dict(vocab_size=BYTE_VOCAB, block_size=256, n_layer=4, n_head=4, n_embd=128),  # ~0.8M
    "shakespeare-char": dict(
        vocab_size=BYTE_VOCAB, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False
    ),
    "small": dict(vocab_size=BYTE_VOCAB, block_size=512, n_layer=6, n_head=6, n_embd=384),  # ~10.7M
    "gpt2-small": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt-250m": dict(vocab_size=50257, block_size=1024, n_layer=16, n_head=16, n_embd=1024),  # ~1 GB fp32
}


def gpt_preset(name: str, **overrides) -> GPTConfig:
    """The model shape `name` with `overrides` (GPTConfig fields) applied."""
    if name not in GPT_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(GPT_PRESETS)}")
    return GPTConfig(**{**GPT_PRESETS[name], **overrides})
