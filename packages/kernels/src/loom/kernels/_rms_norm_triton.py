"""Triton kernels for RMSNorm. Imported lazily by rms_norm.py so that TRITON_INTERPRET,
read when a kernel is decorated, can still be set by the caller before first use.

Both kernels work on 2-D tiles of whole rows (``_launch.row_tile``): Qwen3 normalises
q and k per head, 128-wide rows by the ten thousand, and one 128-element row per program
or per loop step leaves most of each warp idle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.kernels._launch import as_rows, program_count, row_tile

# Elements per program tile: forward, and backward (which holds x, dy and dweight).
FORWARD_TILE = 4096
BACKWARD_TILE = 4096
# Backward programs per SM: each walks tiles and keeps its own dweight partial sum. Two
# measured best on an H100 for hidden 128 to 4096; from 8192 on one is better, since the
# [programs, hidden] fp32 partials are then megabytes written and read back.
BACKWARD_PROGRAMS_PER_SM = 2
WIDE_ROWS = 8192


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_rows, n_cols, eps, offset,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    # 64-bit row indices: rows * stride may pass 2**31.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # [BLOCK_ROWS]
    y = x * rstd[:, None] * (offset + w)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    # Persistent: program p takes tiles p, p + programs, ... and keeps its share of
    # dweight in fp32 registers; the partial sums are added up on the host side.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    w = offset + tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), tl.num_programs(0)):
        rows = tl.arange(0, BLOCK_ROWS).to(tl.int64) + tile * BLOCK_ROWS  # 64-bit offsets
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        g = dy * w[None, :]
        proj = tl.sum(g * x_hat, axis=1) / n_cols  # [BLOCK_ROWS]
        dx = rstd[:, None] * (g - x_hat * proj[:, None])
        dx_ptrs = dx_ptr + rows[:, None] * stride_dx + cols[None, :]
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat  # masked rows and columns hold zeros
    tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., hidden] -> (y, contiguous with x's shape; rstd [rows] fp32)."""
    x_rows, stride_x = as_rows(x)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    block_rows, block_cols, warps = row_tile(n_cols, FORWARD_TILE, "RMSNorm hidden size")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x_rows, weight, y, rstd, stride_x, n_cols, n_rows, n_cols, eps, offset,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
    )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x: [..., hidden] -> (dx, contiguous with x's shape in x.dtype; dweight [hidden]
    in weight.dtype)."""
    (dy_rows, stride_dy), (x_rows, stride_x) = as_rows(dy), as_rows(x)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    block_rows, block_cols, warps = row_tile(n_cols, BACKWARD_TILE, "RMSNorm hidden size")
    per_sm = BACKWARD_PROGRAMS_PER_SM if n_cols < WIDE_ROWS else 1
    programs = program_count(x.device, triton.cdiv(n_rows, block_rows), per_sm)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy_rows, x_rows, weight, rstd, dx, dw_partial,
        stride_dy, stride_x, n_cols, n_rows, n_cols, offset,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)
