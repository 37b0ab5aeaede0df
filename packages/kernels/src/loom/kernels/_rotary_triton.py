"""Triton kernel for rotary embedding: one program per (batch, position) rotates every q
and k head there, so cos/sin are read once per position. Strided in and out (HF's
``[b, s, h, d] -> [b, h, s, d]`` transposed views need no copy). Imported lazily; see
_rms_norm_triton.py."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, stride_x_head, stride_out_head, n_heads, head_dim, half,
    c1, c2, s1, s2,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_row = x_ptr + heads * stride_x_head
    out_row = out_ptr + heads * stride_out_head
    x1 = tl.load(x_row + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + dims, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation below
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out_row + dims, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + half + dims, y2.to(out_ptr.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:  # partial rotary: the dims past 2 * half are copied unchanged
        rest = tl.arange(0, BLOCK_PASS)[None, :]
        rest_mask = (heads < n_heads) & (2 * half + rest < head_dim)
        x = tl.load(x_row + 2 * half + rest, mask=rest_mask, other=0.0)
        tl.store(out_row + 2 * half + rest, x.to(out_ptr.dtype.element_ty), mask=rest_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    stride_q_b, stride_q_s, stride_q_h, stride_k_b, stride_k_s, stride_k_h,
    stride_qo_b, stride_qo_s, stride_qo_h, stride_ko_b, stride_ko_s, stride_ko_h,
    stride_cos_b, stride_cos_s, seq_len, n_q_heads, n_k_heads, head_dim, half,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    # Strides are in elements; cos and sin share theirs. (Scalars, not tuples: tuple
    # arguments are newer than the oldest Triton we support.)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < half
    cos_row = b * stride_cos_b + s * stride_cos_s
    c1 = tl.load(cos_ptr + cos_row + dims, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cos_row + half + dims, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cos_row + dims, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cos_row + half + dims, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + b * stride_q_b + s * stride_q_s,
        q_out_ptr + b * stride_qo_b + s * stride_qo_s,
        stride_q_h, stride_qo_h, n_q_heads, head_dim, half, c1, c2, s1, s2,
        BLOCK_Q_HEADS, BLOCK_HALF, BLOCK_PASS, BACKWARD,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + b * stride_k_b + s * stride_k_s,
        k_out_ptr + b * stride_ko_b + s * stride_ko_s,
        stride_k_h, stride_ko_h, n_k_heads, head_dim, half, c1, c2, s1, s2,
        BLOCK_K_HEADS, BLOCK_HALF, BLOCK_PASS, BACKWARD,
    )  # fmt: skip


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_axis: int,
    backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [batch, heads, seq, dim] (head_axis=1) or [batch, seq, heads, dim] (head_axis=2),
    unit last stride; cos, sin: [batch or 1, seq, rot] with unit last stride.
    Returns new q and k with the same layout as the inputs (empty_like)."""
    seq_axis = 3 - head_axis
    batch, seq_len, head_dim = q.shape[0], q.shape[seq_axis], q.shape[-1]
    n_q_heads, n_k_heads, half = q.shape[head_axis], k.shape[head_axis], cos.shape[-1] // 2
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    q_s, k_s, qo_s, ko_s = q.stride(), k.stride(), q_out.stride(), k_out.stride()
    block_q, block_k, block_half, block_pass = _blocks(n_q_heads, n_k_heads, head_dim, half)
    _rotary_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin,
        q_s[0], q_s[seq_axis], q_s[head_axis], k_s[0], k_s[seq_axis], k_s[head_axis],
        qo_s[0], qo_s[seq_axis], qo_s[head_axis], ko_s[0], ko_s[seq_axis], ko_s[head_axis],
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        seq_len, n_q_heads, n_k_heads, head_dim, half,
        BLOCK_Q_HEADS=block_q, BLOCK_K_HEADS=block_k, BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass, BACKWARD=backward,
    )  # fmt: skip
    return q_out, k_out


@functools.cache
def _blocks(n_q_heads: int, n_k_heads: int, head_dim: int, half: int) -> tuple[int, ...]:
    """(BLOCK_Q_HEADS, BLOCK_K_HEADS, BLOCK_HALF, BLOCK_PASS) for one head layout."""
    rest = head_dim - 2 * half
    return (
        triton.next_power_of_2(n_q_heads),
        triton.next_power_of_2(n_k_heads),
        triton.next_power_of_2(half),
        triton.next_power_of_2(rest) if rest > 0 else 0,
    )
