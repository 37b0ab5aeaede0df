"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from loom.trainer.config import OptimConfig


def build_optimizer(model: nn.Module, optim: OptimConfig, *, device: torch.device) -> Optimizer:
    """AdamW; the fused CUDA implementation on GPUs (one kernel for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        model.parameters(),
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        **fused,
    )


def lr_factor(step: int, optim: OptimConfig, *, steps: int) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based) of ``steps``:
    linear warmup over ``optim.warmup_steps``, then constant, linear or cosine decay to
    ``optim.min_lr_ratio``."""
    warmup, min_ratio = optim.warmup_steps, optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    decay = 1 - progress if optim.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay


def build_scheduler(optimizer: Optimizer, optim: OptimConfig, *, steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, optim, steps=steps))
