"""Triton grouped GEMM for the MoE experts: every expert's rows times that expert's
weight, in one launch per product, with ``group_ends`` read on the device (no host sync).
Imported lazily; see _rms_norm_triton.py.

Rows are grouped by expert: rows ``group_ends[e-1]:group_ends[e]`` belong to expert e.
``grouped_matmul`` cuts each expert's rows into its own BLOCK_M tiles, so no tile
straddles two experts, and numbers the tiles in expert order; each program finds its
expert with a prefix sum over ``group_ends`` (a few hundred bytes, in L2). The grid has
room for the worst case, ``cdiv(M, BLOCK_M) + experts`` row tiles, and programs past the
last tile return at once. ``grouped_weight_grad`` gives each (output tile, expert) one
program that walks that expert's rows: deterministic (no atomics), and an expert
without rows gets a zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch configuration by element size in bytes, the knobs to tune. BLOCK_K is the
# reduction step: the inner feature dim for grouped_matmul, token rows for
# grouped_weight_grad. 16-bit: 128 x 128 output tiles, 64-deep steps, three stages of
# operands in flight (96 KiB of shared memory; an H100 SM has 228 KiB). A 128-row tile
# pads each expert by 64 rows on average, about 3% at 2048 rows per expert (16384
# tokens, top-8 of 64). fp32 (tests and references, not training) takes smaller tiles to
# fit the same shared memory.
MATMUL_CONFIG = {
    2: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
}
WEIGHT_GRAD_CONFIG = {
    2: {"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 64, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32, "num_warps": 4, "num_stages": 3},
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _grouped_matmul_kernel(
    a_ptr, b_ptr, c_ptr, group_ends_ptr, n_experts, n_out, n_inner,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # c[rows of e] = a[rows of e] @ b[e]; b[e] is [n_inner, n_out] through its strides.
    # Output columns vary fastest over program ids: neighbours share a row tile in L2.
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(n_out, BLOCK_N)
    tile_m = pid // col_tiles
    tile_n = pid % col_tiles

    experts = tl.arange(0, BLOCK_E)
    valid = experts < n_experts
    ends = tl.load(group_ends_ptr + experts, mask=valid, other=0)
    starts = tl.load(group_ends_ptr + experts - 1, mask=valid & (experts > 0), other=0)
    tiles = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_through = tl.cumsum(tiles, 0)  # row tiles of experts 0..e
    # The first expert whose tiles reach past tile_m owns it (it has at least one tile).
    expert = tl.sum((tiles_through <= tile_m).to(tl.int32), 0)
    if expert >= n_experts:
        return
    own = experts == expert
    first_tile = tl.sum(tl.where(own, tiles_through - tiles, 0), 0)
    row_start = tl.sum(tl.where(own, starts, 0), 0)
    row_end = tl.sum(tl.where(own, ends, 0), 0)

    rows = row_start + (tile_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end  # the tile's tail may reach into the next expert's rows
    rows = rows.to(tl.int64)  # rows * stride may pass 2**31
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    inner = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + inner[None, :] * stride_ak
    b_ptrs = (
        b_ptr + expert.to(tl.int64) * stride_be
        + inner[:, None] * stride_bk + cols[None, :] * stride_bn
    )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(n_inner, BLOCK_K)):
        inner_mask = inner < n_inner - step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=inner_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_weight_grad_kernel(
    dout_ptr, x_ptr, dw_ptr, group_ends_ptr, n_out, n_in,
    stride_dm, stride_dn, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # dw[e] [n_out, n_in] = dout[rows of e].T @ x[rows of e]. The expert is the slow grid
    # axis, so the programs running together read the same expert's rows.
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    in_tiles = tl.cdiv(n_in, BLOCK_K)
    outs = (pid // in_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = (pid % in_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = outs < n_out
    in_mask = ins < n_in
    row_start = tl.load(group_ends_ptr + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(group_ends_ptr + expert)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows = rows.to(tl.int64)
        dout_t = tl.load(
            dout_ptr + outs[:, None] * stride_dn + rows[None, :] * stride_dm,
            mask=out_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_M]
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ins[None, :] * stride_xk,
            mask=row_mask[:, None] & in_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        if UPCAST:
            dout_t, x = dout_t.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(dout_t, x, acc, input_precision=INPUT_PRECISION)
    dw_ptrs = (
        dw_ptr + expert.to(tl.int64) * stride_we
        + outs[:, None] * stride_wn + ins[None, :] * stride_wk
    )  # fmt: skip
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=out_mask[:, None] & in_mask[None, :])


def _dot_options(t: torch.Tensor) -> dict:
    """INPUT_PRECISION: fp32 products as torch's matmul does them, TF32 only where torch
    allows it (Triton's default "tf32" is ignored for 16-bit inputs). UPCAST: Triton's
    interpreter, the only way Triton runs on CPU, multiplies the bit patterns of bf16
    operands in tl.dot (triton-lang/triton#11584), so it is given them in fp32, which
    is exact for bf16 products; compiled kernels never take that branch."""
    ieee = t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {
        "INPUT_PRECISION": "ieee" if ieee else "tf32",
        "UPCAST": t.device.type == "cpu" and t.dtype == torch.bfloat16,
    }


def grouped_matmul(
    a: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, *, transposed: bool
) -> torch.Tensor:
    """Rows ``group_ends[e-1]:group_ends[e]`` of a [M, inner] times ``weight[e].T``
    (``transposed=True``, weight [E, out, inner]: the forward) or ``weight[e]``
    (``transposed=False``, weight [E, inner, out]: d input) -> [M, out] in a.dtype.
    group_ends: [E] int32 on a's device; rows past ``group_ends[-1]`` are left unwritten."""
    experts = weight.shape[0]
    if transposed:
        n_out, n_inner = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(2), weight.stride(1)
    else:
        n_inner, n_out = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(1), weight.stride(2)
    out = torch.empty((a.shape[0], n_out), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if n_inner == 0:
        return out.zero_()
    config = MATMUL_CONFIG[a.element_size()]
    row_tiles = triton.cdiv(a.shape[0], config["BLOCK_M"]) + experts  # the worst case
    grid = (row_tiles * triton.cdiv(n_out, config["BLOCK_N"]),)
    _grouped_matmul_kernel[grid](
        a, weight, out, group_ends, experts, n_out, n_inner,
        a.stride(0), a.stride(1), weight.stride(0), stride_bk, stride_bn,
        out.stride(0), out.stride(1),
        BLOCK_E=triton.next_power_of_2(experts), **_dot_options(a), **config,
    )  # fmt: skip
    return out


def grouped_weight_grad(
    dout: torch.Tensor, x: torch.Tensor, group_ends: torch.Tensor, weight_dtype: torch.dtype
) -> torch.Tensor:
    """dout [M, out], x [M, in] -> dweight [E, out, in] in ``weight_dtype``:
    ``dout[rows of e].T @ x[rows of e]`` per expert, zeros for an expert without rows."""
    experts, n_out, n_in = group_ends.shape[0], dout.shape[1], x.shape[1]
    dw = torch.empty((experts, n_out, n_in), dtype=weight_dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    config = WEIGHT_GRAD_CONFIG[x.element_size()]
    tiles = triton.cdiv(n_out, config["BLOCK_N"]) * triton.cdiv(n_in, config["BLOCK_K"])
    _grouped_weight_grad_kernel[(tiles, experts)](
        dout, x, dw, group_ends, n_out, n_in,
        dout.stride(0), dout.stride(1), x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        **_dot_options(x), **config,
    )  # fmt: skip
    return dw
