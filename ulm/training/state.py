"""A run's checkpoints: `best` (the best validation so far) and `last` (the latest, plus the trainer state to resume
from: optimizer, RNG states, data position). Tensors go to safetensors and the rest to JSON, so nothing is
unpickled on resume."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ulm.checkpoint import save_checkpoint
from ulm.model import GPT
from ulm.tokenizer import Tokenizer
from ulm.train_config import TrainConfig
from ulm.util import atomic_write_text, read_json_object, replace_dir

LAST, BEST = "last", "best"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_FORMAT = "ulm-trainer-state/1"
# keys a resumed run may change; anything else must match the interrupted run
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "eval_examples", "stop_accuracy", "stop_patience",
             "log_interval", "checkpoint_interval", "device", "threads", "compile", "dataset"}


def staging_dir(out: Path, name: str) -> Path:
    """An empty temporary folder beside `name`, swapped in for it once complete."""
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def clear_stale(out: Path) -> None:
    for stale in out.glob(".*.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def save_best(out: Path, model: GPT, tokenizer: Tokenizer, extra: dict) -> None:
    tmp = staging_dir(out, BEST)
    save_checkpoint(tmp, model, tokenizer, extra)
    replace_dir(tmp, out / BEST, out / f"{BEST}.old")


def save_last(out: Path, model: GPT, tokenizer: Tokenizer, extra: dict, optimizer: torch.optim.Optimizer,
              tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write the checkpoint and trainer state to a temporary directory, then swap it in for `last`."""
    tmp = staging_dir(out, LAST)
    save_checkpoint(tmp, model, tokenizer, extra)
    sd = optimizer.state_dict()
    for i, s in sd["state"].items():
        for k, v in s.items():
            tensors[f"optim.{i}.{k}"] = v
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    state = {"format": STATE_FORMAT, **state, "param_groups": sd["param_groups"]}
    atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=1))
    replace_dir(tmp, out / LAST, out / f"{LAST}.old")


def find_last(out: Path) -> Path | None:
    for d in (out / LAST, out / f"{LAST}.old"):
        if (d / STATE_JSON).is_file():
            return d
    return None


def read_state(directory: Path) -> dict:
    path = directory / STATE_JSON
    state = read_json_object(path)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a µLM trainer state")
    return state


def load_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    state = read_state(directory)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except Exception as e:  # safetensors raises its own error type for truncated files
        raise ValueError(f"{directory / STATE_TENSORS} is unreadable: {e}") from e
    return state, tensors


def saved_config(out: str | os.PathLike) -> dict | None:
    """The configuration of a resumable run in `out`, or None."""
    last = find_last(Path(out))
    return None if last is None else read_state(last)["config"]


def check_resumable(cfg: TrainConfig, state: dict, out: Path) -> None:
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE and state["config"].get(k) != v)
    if changed:
        raise ValueError(f"cannot resume {out}: config differs from the saved run in {', '.join(changed)}")


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    opt_state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = t
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def rng_tensors(data_gen: torch.Generator, everyone: list[dict]) -> dict[str, torch.Tensor]:
    """The shared data generator's state and every process's torch (and CUDA) RNG state, by rank."""
    tensors = {"rng.data": data_gen.get_state()}
    for r, e in enumerate(everyone):
        tensors[f"rng.torch.{r}"] = e["torch"]
        if e["cuda"] is not None:
            tensors[f"rng.cuda.{r}"] = e["cuda"]
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], saved_rank: int, data_gen: torch.Generator,
                device: torch.device) -> None:
    data_gen.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors[f"rng.torch.{saved_rank}"])
    if device.type == "cuda" and f"rng.cuda.{saved_rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{saved_rank}"])
