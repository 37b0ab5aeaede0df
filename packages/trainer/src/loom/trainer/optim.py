"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from loom.trainer.config import OptimConfig
from loom.trainer.errors import ConfigError


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """One group, or with ``optim.vision_lr`` two: the text decoder first (its lr is the one
    logged), then the vision tower and its merger (``model.visual.*``). Frozen parameters
    (``model.freeze_vit``) are left out."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optim.vision_lr is None:
        return [{"params": [p for _, p in trainable]}]
    is_vision = [".visual." in f".{n}" for n, _ in trainable]
    if not any(is_vision):
        raise ConfigError("optim.vision_lr: the model has no trainable vision tower (model.visual)")
    return [
        {"params": [p for (_, p), v in zip(trainable, is_vision, strict=True) if not v]},
        {"params": [p for (_, p), v in zip(trainable, is_vision, strict=True) if v], "lr": optim.vision_lr},
    ]  # fmt: skip


def build_optimizer(model: nn.Module, optim: OptimConfig, *, device: torch.device) -> Optimizer:
    """AdamW; the fused CUDA implementation on GPUs (one kernel for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, optim),
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
