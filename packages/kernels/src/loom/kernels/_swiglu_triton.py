"""Triton kernels for SwiGLU over evenly strided rows (unit last stride, any row stride, so
the two halves of a fused gate_up projection need no copy; see _launch.as_rows).
Imported lazily; see _rms_norm_triton.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.kernels._launch import as_rows

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, n_cols, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, n_cols,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + row * stride_dgate + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(
        dup_ptr + row * stride_dup + cols, (dout * silu).to(dup_ptr.dtype.element_ty), mask=mask
    )


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., cols] -> silu(gate) * up, contiguous with gate's shape."""
    (gate_rows, stride_gate), (up_rows, stride_up) = as_rows(gate), as_rows(up)
    n_cols = gate.shape[-1]
    n_rows = gate.numel() // n_cols if n_cols else 0
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
        gate_rows, up_rows, out, stride_gate, stride_up, n_cols, n_cols, BLOCK=BLOCK
    )
    return out


def swiglu_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dgate, dup), contiguous with gate's shape."""
    (dout_rows, stride_dout), (gate_rows, stride_gate) = as_rows(dout), as_rows(gate)
    up_rows, stride_up = as_rows(up)
    n_cols = gate.shape[-1]
    n_rows = gate.numel() // n_cols if n_cols else 0
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
        dout_rows, gate_rows, up_rows, dgate, dup,
        stride_dout, stride_gate, stride_up, n_cols, n_cols, n_cols,
        BLOCK=BLOCK,
    )  # fmt: skip
    return dgate, dup
