"""Triton kernels for SwiGLU over evenly strided rows (unit last stride, any row stride, so
the two halves of a fused gate_up projection need no copy; see _launch.as_rows).
Imported lazily; see _rms_norm_triton.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.kernels._launch import as_rows

BLOCK = 1024
Rows = tuple[torch.Tensor, int]  # as_rows' (tensor, row stride in elements)


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
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    overwrite_gate: bool = False,
    overwrite_up: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dgate, dup) with gate's shape.

    ``overwrite_gate`` writes dgate over ``gate``'s memory and returns it (``overwrite_up``
    likewise dup over ``up``), and bumps its autograd version counter, which Triton's
    writes do not. Where the write could change an element that the kernel reads elsewhere
    (inputs that share memory, rows that overlap), a new tensor is returned instead.
    """
    dout_rows, gate_rows, up_rows = as_rows(dout), as_rows(gate), as_rows(up)
    n_cols = gate.shape[-1]
    n_rows = gate.numel() // n_cols if n_cols else 0
    dgate, dgate_rows, gate_overwritten = _gradient_buffer(
        gate, gate_rows, overwrite_gate, (dout_rows, up_rows), n_rows
    )
    dup, dup_rows, up_overwritten = _gradient_buffer(
        up, up_rows, overwrite_up, (dout_rows, gate_rows), n_rows
    )
    _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
        dout_rows[0], gate_rows[0], up_rows[0], dgate_rows[0], dup_rows[0],
        dout_rows[1], gate_rows[1], up_rows[1], dgate_rows[1], dup_rows[1], n_cols,
        BLOCK=BLOCK,
    )  # fmt: skip
    for t, overwritten in ((gate, gate_overwritten), (up, up_overwritten)):
        if overwritten:  # one tensor per call: torch < 2.5 takes no list
            torch.autograd.graph.increment_version(t)
    return dgate, dup


def _gradient_buffer(
    t: torch.Tensor, rows: Rows, overwrite: bool, others: tuple[Rows, ...], n_rows: int
) -> tuple[torch.Tensor, Rows, bool]:
    """Where the kernel writes t's gradient: (gradient, its rows, whether t was overwritten).

    ``rows`` is ``as_rows(t)``; ``others`` the other operands. Each program reads its
    elements before writing them, so writing over ``rows`` is safe when its rows do not
    overlap (a stride-0 expand does) and no other operand holds any of its elements.
    """
    n_cols = t.shape[-1]
    overlapping_rows = n_rows > 1 and rows[1] < n_cols
    if not overwrite or overlapping_rows or any(_share(rows, o, n_rows, n_cols) for o in others):
        new = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return new, (new, n_cols), False
    if rows[0].untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        return rows[0].view(t.shape), rows, False  # as_rows copied t: the copy is ours
    return t.detach(), rows, True


def _share(a: Rows, b: Rows, n_rows: int, n_cols: int) -> bool:
    """Whether two [n_rows, n_cols] row layouts with unit column stride share an element."""
    (a_tensor, stride), (b_tensor, b_stride) = a, b
    if a_tensor.untyped_storage().data_ptr() != b_tensor.untyped_storage().data_ptr():
        return False
    shift = b_tensor.storage_offset() - a_tensor.storage_offset()
    if n_rows <= 1:
        return abs(shift) < n_cols
    if stride != b_stride or stride < n_cols:
        return True  # no caller passes these; not worth the arithmetic
    # a[r, c] is b[r', c'] where shift = (r - r') * stride + (c - c'); only the row
    # differences k nearest shift / stride can leave |c - c'| < n_cols.
    nearest = shift // stride
    row_differences = {min(max(k, 1 - n_rows), n_rows - 1) for k in (nearest, nearest + 1)}
    return any(abs(shift - k * stride) < n_cols for k in row_differences)
