"""Triton kernels for RMSNorm. Imported lazily by rms_norm.py so that TRITON_INTERPRET,
read when a kernel is decorated, can still be set by the caller before first use."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.kernels._launch import program_count, row_block


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, offset,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd * (offset + w)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, rows_per_program,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # Persistent: each program walks a contiguous range of rows and keeps its share of
    # dweight in fp32 registers; the partial sums are added up on the host side.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = offset + tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    # 64-bit row indices: rows * stride may pass 2**31.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, hidden] (unit stride in the last dim) -> (y [rows, hidden], rstd [rows] fp32)."""
    n_rows, n_cols = x.shape
    block, warps = row_block(n_cols, "RMSNorm hidden size")
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _rms_norm_fwd_kernel[(n_rows,)](
        x, weight, y, rstd, x.stride(0), y.stride(0), n_cols, eps, offset,
        BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [rows, hidden] in x.dtype, dweight [hidden] in weight.dtype)."""
    n_rows, n_cols = x.shape
    block, warps = row_block(n_cols, "RMSNorm hidden size")
    programs = program_count(x.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    dx = torch.empty_like(x)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx, dw_partial,
        dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols, offset, rows_per_program,
        BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)
