"""What a run trains on. Each task's data class (TokenData for a dataset built by ulm.data, AdditionData for the
synthetic adder) has the TaskData interface, so the trainer and `ulm eval` need no task of their own: the task
decides how it is validated, what its held-out test is, and what a checkpoint records to rebuild it."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ulm.addition import AdditionTask, exact_match
from ulm.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint
from ulm.model import GPT
from ulm.progress import progress_bar
from ulm.tokenizer import Tokenizer
from ulm.train_config import TrainConfig
from ulm.training.loss import mean_loss

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (N, T) and targets (N, T)


class TaskData(Protocol):
    tokenizer: Tokenizer
    block_size: int  # the longest sequence the task feeds the model

    def sample(self, split: str, n: int, generator: torch.Generator) -> Batch:
        """n random training-style examples of a split."""

    def extra(self) -> dict:
        """What a checkpoint's config.json records so that `ulm eval` (or a server) can rebuild the task."""

    def validate(self, model: GPT, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict:
        """{"val_loss": ...} and any other "val_*" score, on the same examples every time ("val_accuracy", where a
        task has it, ranks checkpoints before the loss and is what stop_accuracy watches)."""

    def test(self, best: Path, device: torch.device) -> dict:
        """The held-out results of the best checkpoint for summary.json ("test_*"; {} when the task has none)."""

    def evaluate(self, model: GPT, split: str | None, batch_size: int, device: torch.device,
                 progress: bool) -> dict:
        """`ulm eval`: {"split", "loss", "perplexity", ...} of a checkpoint's model."""


class TokenData:
    """Windows of a token dataset built by ulm.data: x = ids[i : i + T], y = ids[i + 1 : i + T + 1]."""

    def __init__(self, directory: str | os.PathLike, block_size: int):
        from ulm.data.dataset import load_manifest, load_split, load_tokenizer

        self.directory = str(directory)
        manifest = load_manifest(directory)
        self.tokenizer = load_tokenizer(directory)
        self.splits = {s: load_split(directory, s) for s in manifest["splits"]}
        self.block_size = block_size
        for split in ("train", "val"):
            n = len(self.splits.get(split, ()))
            if n <= block_size:
                raise ValueError(f"dataset {directory}: split {split!r} has {n} tokens, fewer than a block "
                                 f"({block_size} + 1)")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TokenData:
        if not cfg.dataset:
            raise ValueError("dataset: task 'lm' needs a dataset directory (--dataset DIR, built by `ulm data build`)")
        return cls(cfg.dataset, cfg.model_config(vocab_size=1).block_size)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, meta: dict, model: GPT, tokenizer: Tokenizer,
                        dataset: str | os.PathLike | None) -> TokenData:
        """The dataset given, else the one the checkpoint was trained on; it must share the checkpoint's vocabulary."""
        dataset = dataset or meta.get("dataset")
        if not dataset:
            raise ValueError("dataset: this checkpoint records none; pass --dataset DIR")
        data = cls(dataset, model.config.block_size)
        if data.tokenizer.vocabulary() != tokenizer.vocabulary():
            raise ValueError(f"dataset {dataset} was tokenized with a different vocabulary than the checkpoint's")
        return data

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise ValueError(f"dataset {self.directory}: no split {name!r} (has: {', '.join(self.splits)})")
        return self.splits[name]

    def sample(self, split: str, n: int, generator: torch.Generator) -> Batch:
        data, T = self.split(split), self.block_size
        ix = torch.randint(len(data) - T, (n,), generator=generator).numpy()
        rows = torch.from_numpy(data[ix[:, None] + np.arange(T + 1)].astype(np.int64))  # (n, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """Consecutive non-overlapping windows covering the split (the tail shorter than a block is dropped)."""
        data, T = self.split(split), self.block_size
        n = (len(data) - 1) // T
        for i in range(0, n, batch_size):
            starts = np.arange(i, min(i + batch_size, n)) * T
            rows = torch.from_numpy(data[starts[:, None] + np.arange(T + 1)].astype(np.int64))
            yield rows[:, :-1], rows[:, 1:]

    def extra(self) -> dict:
        return {"task": "lm", "dataset": self.directory}

    def validate(self, model: GPT, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same val batches at every evaluation
        batches = (self.sample("val", cfg.batch_size, g) for _ in range(cfg.eval_iters))
        return {"val_loss": mean_loss(model, batches, device, dtype)}

    def test(self, best: Path, device: torch.device) -> dict:
        return {}

    def evaluate(self, model: GPT, split: str | None, batch_size: int, device: torch.device,
                 progress: bool) -> dict:
        split = split or "val"
        windows = (len(self.split(split)) - 1) // self.block_size
        batches = progress_bar(self.batches(split, batch_size), total=math.ceil(windows / batch_size),
                               disable=not progress, desc=f"eval {split}")
        loss = mean_loss(model, batches, device)
        return {"split": split, "loss": loss, "perplexity": math.exp(loss), "tokens": windows * self.block_size}


class AdditionData:
    """The addition task (ulm.addition): examples made on the fly, judged by greedy exact match as well as loss."""

    EVAL_BATCH = 1024  # prompts per forward pass when judging

    def __init__(self, task: AdditionTask):
        self.task = task
        self.tokenizer = task.tokenizer
        self.block_size = task.block_size

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> AdditionData:
        return cls(AdditionTask(cfg.digits, cfg.reverse, cfg.val_fraction, cfg.test_fraction, cfg.split_seed))

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, meta: dict, model: GPT, tokenizer: Tokenizer,
                        dataset: str | os.PathLike | None) -> AdditionData:
        if dataset:
            raise ValueError("an addition checkpoint makes its own data: --dataset does not apply")
        try:
            return cls(AdditionTask.from_extra(meta))
        except ValueError as e:  # a field out of range: name the file it came from
            raise CheckpointError(f"{Path(checkpoint) / CONFIG_FILE}: {e}") from e

    def sample(self, split: str, n: int, generator: torch.Generator) -> Batch:
        return self.task.sample(split, n, generator)

    def extra(self) -> dict:
        return self.task.to_extra()

    def judge(self, model: GPT, pairs: np.ndarray, device: torch.device,
              dtype: torch.dtype = torch.float32) -> tuple[float, float]:
        """Loss (under `dtype` autocast) and greedy exact match (in float32, as served) on operand pairs."""
        n = self.EVAL_BATCH
        loss = mean_loss(model, (self.task.batch(pairs[i: i + n]) for i in range(0, len(pairs), n)), device, dtype)
        return loss, exact_match(model, self.task, pairs, device=device)

    def validate(self, model: GPT, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict:
        loss, acc = self.judge(model, self.task.pairs("val", cfg.eval_examples), device, dtype)
        return {"val_loss": loss, "val_accuracy": acc}

    def test(self, best: Path, device: torch.device) -> dict:
        """The held-out test pairs, which training never saw."""
        model, _, _ = load_checkpoint(best, device=device)
        loss, acc = self.judge(model, self.task.pairs("test"), device)
        return {"test_loss": loss, "test_accuracy": acc}

    def evaluate(self, model: GPT, split: str | None, batch_size: int, device: torch.device,
                 progress: bool) -> dict:
        split = split or "test"
        pairs = self.task.pairs(split)
        loss, acc = self.judge(model, pairs, device)
        return {"split": split, "loss": loss, "perplexity": math.exp(loss), "accuracy": acc, "examples": len(pairs)}


# each TrainConfig.task's data class; both build themselves from a config (from_config) or a checkpoint
TASK_DATA: dict[str, type[TokenData] | type[AdditionData]] = {"lm": TokenData, "addition": AdditionData}


def load_data(cfg: TrainConfig) -> TaskData:
    return TASK_DATA[cfg.task].from_config(cfg)


def checkpoint_data(checkpoint: Path, meta: dict, model: GPT, tokenizer: Tokenizer,
                    dataset: str | os.PathLike | None = None) -> TaskData:
    """The data a checkpoint is judged on: its task's (a checkpoint that names none is a language model)."""
    return TASK_DATA.get(meta.get("task"), TokenData).from_checkpoint(checkpoint, meta, model, tokenizer, dataset)
