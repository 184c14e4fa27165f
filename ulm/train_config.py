"""Training configuration: a flat dataclass, read from training recipes and TOML files, with `key=value` overrides.

Layering, later wins: a recipe (ulm/presets/NAME.toml, `ulm train --preset NAME`), a --config file, then --set
overrides and flags. Keys are TrainConfig fields, or GPTConfig fields (n_layer, dropout, ...) that override the
model shape the config names (`model`, a key of ulm.config.GPT_PRESETS). A recipe names a shape and states only
its training hyper-parameters (the context length it trains at among them) and the model fields it changes.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ulm.config import GPT_PRESETS, GPTConfig, check_types, field_types, gpt_preset

TASKS = ("lm", "addition")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    # what to learn
    task: str = "lm"  # "lm": a token dataset built by `ulm data`; "addition": synthetic, made on the fly
    dataset: str = ""  # dataset directory (task "lm")
    digits: int = 2  # addition: operand digits
    reverse: bool = False  # addition: answer digits least-significant first
    val_fraction: float = 0.1  # addition: share of operand pairs held out for validation
    test_fraction: float = 0.1  # addition: and for the final test
    split_seed: int = 0  # addition: which pairs fall in which split
    # model: a model shape (GPT_PRESETS); GPTConfig fields given as keys override it (vocab_size: the tokenizer's)
    model: str = "tiny"
    model_args: dict = field(default_factory=dict)
    # optimisation
    max_iters: int = 2000
    batch_size: int = 12  # sequences per process and micro-step
    grad_accum: int = 1  # micro-steps per iteration
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # cosine: the floor it decays to
    schedule: str = "cosine"  # cosine | inverse_sqrt (the paper's; peak lr at warmup_iters) | constant
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # cosine: iterations to reach min_lr (0 = max_iters)
    weight_decay: float = 0.1  # on 2-D weights (matmuls, embeddings); none on biases and norms
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # iterations between validations (and `best` checkpoints)
    eval_iters: int = 20  # val batches per loss estimate
    eval_examples: int = 1000  # addition: val prompts for greedy exact match (0 = the whole split)
    stop_accuracy: float = 0.0  # addition: stop once val exact match reaches this (0 = off) ...
    stop_patience: int = 1  # ... at this many evaluations in a row
    log_interval: int = 10
    checkpoint_interval: int = 0  # iterations between `last` checkpoints (0 = eval_interval)
    # system
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 autocast where the hardware has it natively (CUDA, AVX512-BF16), else float32
    compile: bool = False  # torch.compile the model for training
    threads: int = 0  # intra-op threads per process (0 = usable cores / local processes)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        choices = {"task": TASKS, "schedule": SCHEDULES, "dtype": DTYPES, "model": tuple(GPT_PRESETS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                     "stop_patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "eval_examples", "checkpoint_interval", "threads",
                     "weight_decay", "grad_clip", "min_lr", "split_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.stop_accuracy <= 1.0:
            raise ValueError(f"stop_accuracy must be in [0, 1], got {self.stop_accuracy}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        self.model_config(vocab_size=1)  # checks the model fields

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    @property
    def save_interval(self) -> int:
        return self.checkpoint_interval or self.eval_interval

    def model_config(self, vocab_size: int, min_block_size: int = 0) -> GPTConfig:
        """The model shape with this config's overrides and the tokenizer's vocabulary."""
        args = {**self.model_args, "vocab_size": vocab_size}
        cfg = gpt_preset(self.model, **args)
        if cfg.block_size < min_block_size:
            raise ValueError(f"block_size ({cfg.block_size}) is shorter than the task's sequences "
                             f"({min_block_size})")
        return cfg

    def to_dict(self) -> dict:
        """Flat: model overrides sit beside the training keys, as in the TOML files."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model_args"}
        return {**d, **self.model_args}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        return cls(**split_keys(check_types(d, KEY_TYPES, source)))


# ----------------------------------------------------------------------------------------------------------
# keys and types

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_args"}
MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
KEY_TYPES = {k: t for k, t in field_types(GPTConfig, TrainConfig).items() if k in TRAIN_FIELDS | MODEL_FIELDS}


def split_keys(d: dict) -> dict:
    """Route GPTConfig keys into model_args."""
    model_args = {k: v for k, v in d.items() if k in MODEL_FIELDS}
    return {**{k: v for k, v in d.items() if k not in MODEL_FIELDS}, "model_args": model_args}


def parse_override(item: str) -> tuple[str, object]:
    """`key=value`, the value read as a TOML value (3e-4, true, "x"), or else as a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    if isinstance(value, (int, float)) and KEY_TYPES.get(key) == "str":
        value = text.strip()  # e.g. dataset=2024
    return key, value


# ----------------------------------------------------------------------------------------------------------
# training recipes (ulm/presets/NAME.toml) and files


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("ulm.presets").iterdir()
                  if p.name.endswith(".toml"))


def read_recipe(name: str) -> dict:
    if name not in recipe_names():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(recipe_names())}")
    text = resources.files("ulm.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {p}: {e}") from e


def build_config(recipe: str | None = None, config_file: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = (), values: dict | None = None,
                 base: dict | None = None) -> TrainConfig:
    """Layer base (a saved run's config), the recipe, the file, `key=value` overrides, then typed `values`
    (command-line flags); keys and types are checked at each layer."""
    d: dict = {}
    if base is not None:
        d.update(check_types(base, KEY_TYPES, "saved config"))
    if recipe:
        d.update(check_types(read_recipe(recipe), KEY_TYPES, f"preset {recipe}"))
    if config_file:
        d.update(check_types(read_toml(config_file), KEY_TYPES, str(config_file)))
    for item in overrides:
        key, value = parse_override(item)
        d.update(check_types({key: value}, KEY_TYPES, f"--set {item}"))
    d.update(check_types(values or {}, KEY_TYPES, "option"))
    return TrainConfig.from_dict(d)
