"""Modules that generated ports import in place of upstream ones (Liger's split: the
kernels live in loom.kernels, the modules that call them here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class LoomCentredRMSNorm(nn.Module):
    """Drop-in for the zero-centred ``*RMSNorm`` of Qwen3-Next and Qwen3.5: the scale is
    ``1 + weight`` (zeros at init), applied in fp32 and rounded once, as upstream does;
    the fused kernel's ``offset=1``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=1.0)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LoomRMSNormGated(nn.Module):
    """Drop-in for Gated DeltaNet's ``*RMSNormGated``: ``rms_norm(x) * silu(gate)``, the
    norm by the fused kernel, the gate in fp32. In fp32 upstream's; in bf16 the norm
    rounds once where upstream rounds twice."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return (normed.float() * F.silu(gate.float())).to(hidden_states.dtype)
