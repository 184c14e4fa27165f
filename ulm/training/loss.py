"""The language-model loss, for training and as a token-weighted mean over evaluation batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ulm.addition import IGNORE
from ulm.model import GPT
from ulm.training.device import autocast


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets that are not IGNORE. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.inference_mode()
def mean_loss(model: GPT, batches, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Token-weighted mean loss over (x, y) batches."""
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        n = int((y != IGNORE).sum())
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += n
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return total / count
