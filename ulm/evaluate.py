"""`ulm eval`: loss and perplexity of a checkpoint on a split of its task's data (and greedy exact match for the
adder); the checkpoint's task decides the data and the scores (ulm.training.tasks)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ulm.checkpoint import load_checkpoint
from ulm.training.tasks import checkpoint_data


def evaluate(checkpoint: str | os.PathLike, dataset: str | os.PathLike | None = None, split: str | None = None,
             batch_size: int = 64, device: str = "cpu", progress: bool = False) -> dict:
    """Loss and perplexity of a checkpoint on a split (default: test for addition, val for datasets), and
    greedy exact match for addition."""
    model, tokenizer, meta = load_checkpoint(checkpoint, device=device)
    data = checkpoint_data(Path(checkpoint), meta, model, tokenizer, dataset)
    return data.evaluate(model, split, batch_size, torch.device(device), progress)
