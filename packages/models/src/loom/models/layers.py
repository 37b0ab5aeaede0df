"""Modules that generated ports import in place of upstream ones (Liger's split: the
kernels live in loom.kernels, the modules that call them here)."""

from __future__ import annotations

import torch
from torch import nn

from loom.kernels import rms_norm


class LoomRMSNorm(nn.Module):
    """Drop-in for the Llama-family ``*RMSNorm``: same parameter (``weight``), same
    attribute (``variance_epsilon``), same result in fp32; the fused kernel normalises
    and scales in fp32 and rounds once, so in bf16 it differs from upstream's two
    roundings by at most one bf16 ulp."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
