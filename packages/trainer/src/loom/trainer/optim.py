"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Schedule = Literal["constant", "linear", "cosine"]


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device,
) -> Optimizer:
    """AdamW; the fused CUDA implementation on GPUs (one kernel for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **fused
    )


def lr_factor(step: int, schedule: Schedule, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based): linear warmup
    over ``warmup`` steps, then constant, linear or cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay


def build_scheduler(
    optimizer: Optimizer, schedule: Schedule, warmup: int, total: int, min_ratio: float
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, schedule, warmup, total, min_ratio))
