"""Gated DeltaNet's two sequence ops: the gated delta rule and the short causal
convolution, each a plain-torch reference plus flash-linear-attention's Triton kernels
(``fla-core``) on CUDA where it is installed.

Both take packed rows: with ``cu_seqlens`` (boundaries of the samples laid end to end in
a batch of one row) every sample's recurrent state and convolution window start at zero,
as if it were alone.

The gated delta rule, per value head, with q and k L2-normalised and q scaled by
``scale`` (default ``1/sqrt(K)``), a state ``S`` [K, V] from zero::

    S = exp(g_t) * S
    S = S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T q_t

``g`` is the log of the decay (negative), ``beta`` the write strength in [0, 1]. The
reference runs that recurrence in fp32 (or fp64), token by token; the kernel runs its chunked form.
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import torch
import torch.nn.functional as F

from loom.kernels.dispatch import BACKEND_ENV

_FLA = importlib.util.find_spec("fla") is not None


def fla_available() -> bool:
    return _FLA


def _backend(tensor: torch.Tensor, backend: str | None) -> str:
    choice = backend or ("torch" if os.environ.get(BACKEND_ENV) == "torch" else "auto")
    if choice not in ("auto", "fla", "torch"):
        raise ValueError(f"loom.kernels: backend must be 'fla' or 'torch', got {choice!r}")
    if choice == "auto":
        return "fla" if _FLA and tensor.is_cuda else "torch"
    if choice == "fla" and not (_FLA and tensor.is_cuda):
        raise RuntimeError("backend 'fla' needs fla-core installed and CUDA tensors")
    return choice


def _segments(length: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, length)]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or sorted(bounds) != bounds:
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the row's {length} tokens")
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _check_packed(x: torch.Tensor, cu_seqlens: torch.Tensor | None, name: str) -> None:
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(
            f"{name}: with cu_seqlens the samples are packed in one row; got {x.shape[0]}"
        )


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H: each q/k head serves
    HV / H value heads); g, beta: [B, T, HV] -> o [B, T, HV, V] in v's dtype."""
    _check_packed(q, cu_seqlens, "gated_delta_rule")
    if v.shape[2] % q.shape[2] or k.shape != q.shape:
        raise ValueError(
            f"gated_delta_rule: q {tuple(q.shape)} and k {tuple(k.shape)} must match and "
            f"divide v's heads {tuple(v.shape)}"
        )
    if _backend(q, backend) == "torch":
        return gated_delta_rule_reference(q, k, v, g, beta, scale=scale, cu_seqlens=cu_seqlens)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, _ = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True
    )
    return o


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recurrence of the module docstring, in fp32 (fp64 inputs: in fp64); autograd
    gives the backward."""
    groups = v.shape[2] // q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(v.dtype, torch.float32)
    q = F.normalize(q.to(dtype), dim=-1, eps=1e-6).repeat_interleave(groups, dim=2) * scale
    k = F.normalize(k.to(dtype), dim=-1, eps=1e-6).repeat_interleave(groups, dim=2)
    vf, decay, beta = v.to(dtype), g.to(dtype).exp(), beta.to(dtype)
    batch, length, heads, _ = k.shape
    outputs = []
    for start, end in _segments(length, cu_seqlens):
        state = vf.new_zeros(batch, heads, k.shape[-1], v.shape[-1])
        for t in range(start, end):
            state = state * decay[:, t, :, None, None]
            kt = k[:, t]
            delta = (vf[:, t] - torch.einsum("bhkv,bhk->bhv", state, kt)) * beta[:, t, :, None]
            state = state + kt[..., None] * delta[..., None, :]
            outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1).to(v.dtype)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution: x [B, T, D], weight [D, W] -> [B, T, D]; output t
    sees inputs t - W + 1 .. t of its own sample; then ``activation`` (silu or None)."""
    _check_packed(x, cu_seqlens, "causal_conv1d")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"causal_conv1d: weight must be [channels, width] for x {tuple(x.shape)}; got "
            f"{tuple(weight.shape)}"
        )
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")
    if _backend(x, backend) == "torch":
        return causal_conv1d_reference(x, weight, activation=activation, cu_seqlens=cu_seqlens)
    from fla.modules.convolution import causal_conv1d as fla_causal_conv1d

    y, _ = fla_causal_conv1d(x, weight, activation=activation, cu_seqlens=cu_seqlens)
    return y


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv1d`` over each sample, left-padded with zeros."""
    width = weight.shape[1]
    parts = []
    for start, end in _segments(x.shape[1], cu_seqlens):
        part = F.pad(x[:, start:end].transpose(1, 2), (width - 1, 0))
        parts.append(F.conv1d(part, weight[:, None, :], groups=weight.shape[0]).transpose(1, 2))
    y = torch.cat(parts, dim=1)
    return F.silu(y) if activation == "silu" else y
