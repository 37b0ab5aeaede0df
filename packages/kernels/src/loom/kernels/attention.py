"""Attention over packed rows: q/k/v hold many sequences back to back, ``cu_seqlens``
marks where each starts, and no token attends across a boundary.

Backends (dispatch.choose_attention_backend picks): flash-attn's varlen kernel when
installed; torch's ``varlen_attn`` (torch.nn.attention.varlen) when this torch has it;
SDPA with an explicit block-diagonal mask anywhere else (O(tokens^2) mask memory, a
fallback); and ``"torch"``, a per-sequence fp32 loop used as the reference in tests.
"""

from __future__ import annotations

import inspect
import itertools
import math

import torch
import torch.nn.functional as F

from loom.kernels.dispatch import choose_attention_backend, torch_varlen_available


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """q: [tokens, q_heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (q_heads a
    multiple of kv_heads: GQA); cu_seqlens: [sequences + 1] int, 0 first, tokens last;
    max_seqlen: the longest sequence. Returns [tokens, q_heads, head_dim].
    ``scale`` defaults to ``head_dim ** -0.5``."""
    _check_inputs(q, k, v, cu_seqlens)
    chosen = choose_attention_backend(q, backend)
    if chosen == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal
        )
    if chosen == "varlen":
        return _torch_varlen(q, k, v, cu_seqlens.to(torch.int32), max_seqlen, causal, scale)
    if chosen == "sdpa":
        return _sdpa_block_diagonal(q, k, v, cu_seqlens, causal, scale)
    return varlen_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=scale)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Each sequence on its own, softmax(q k^T * scale) v written out in fp32 (or wider)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qs = q[start:end].to(wide)
        ks = k[start:end].to(wide).repeat_interleave(group, dim=1)
        vs = v[start:end].to(wide).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
    return torch.cat(outputs).to(q.dtype)


def _check_inputs(q, k, v, cu_seqlens) -> None:
    name = "varlen_attention"
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(
            f"{name}: q must be [tokens, heads, head_dim] and k, v [tokens, kv_heads, head_dim]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must share tokens and head_dim, "
            "with q heads a multiple of kv heads"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{name}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name}: cu_seqlens must be a 1-D integer tensor [sequences + 1]; got "
            f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )


def _sdpa_block_diagonal(q, k, v, cu_seqlens, causal, scale) -> torch.Tensor:
    tokens = q.shape[0]
    positions = torch.arange(tokens, device=q.device)
    # Sequence id of each token; tokens past cu_seqlens[-1] (padding) only see each other.
    seq_id = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    mask = seq_id[:, None] == seq_id[None, :]  # [tokens, tokens]
    if causal:
        mask &= positions[:, None] >= positions[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, heads, tokens, head_dim]
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


def _varlen_parameters() -> frozenset[str]:
    if not torch_varlen_available():
        return frozenset()
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


# Read once at import, not through a cached function, which Dynamo warns about.
_VARLEN_PARAMETERS = _varlen_parameters()


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale) -> torch.Tensor:
    """torch's varlen_attn, whose keyword arguments changed between releases."""
    from torch.nn.attention.varlen import varlen_attn

    params = _VARLEN_PARAMETERS
    kwargs = {}
    if "window_size" in params:  # torch >= 2.10: causal is a (-1, 0) window
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kwargs["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # fold a custom scale into q: softmax((q * c) k^T / sqrt(d))
            q = q * (scale * math.sqrt(q.shape[-1]))
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
