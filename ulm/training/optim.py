"""Optimisation: AdamW (weight decay on 2-D weights only) and the learning-rate schedules (linear warmup then
cosine decay or constant, or the paper's inverse square root)."""
from __future__ import annotations

import math

import torch

from ulm.model import GPT
from ulm.train_config import TrainConfig


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D tensors (matmul weights, embeddings) and none on biases and norms; fused,
    one kernel over all parameters."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of iteration `step` (0-based)."""
    warmup = cfg.warmup_iters
    if cfg.schedule == "inverse_sqrt":
        # the paper: d^-0.5 * min(s^-0.5, s * w^-1.5), scaled so that its peak (s = w) is cfg.lr
        s, w = step + 1, max(warmup, 1)
        return cfg.lr * min(s / w, math.sqrt(w / s))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= cfg.decay_iters:
        return cfg.min_lr
    ratio = (step - warmup) / max(1, cfg.decay_iters - warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
