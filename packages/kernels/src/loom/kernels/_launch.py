"""Launch settings shared by the Triton kernels of loom.kernels.

Everything here is a pure function of shapes and the device, and is cached: these run on
every op call, and the training step's GPU waits on them when the kernels are small.
"""

from __future__ import annotations

import functools

import torch
import triton

# One Triton program holds a whole row of this many elements at most (fp32 registers).
MAX_FUSED_SIZE = 65536


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` [..., cols] as evenly strided rows: (tensor, row stride in elements).

    A contiguous ``t`` is passed as it is, whatever its rank (no reshape now, no view
    back later); anything else becomes [rows, cols] with a unit last stride, a view when
    the layout allows (the halves of ``gate_up.chunk(2, -1)``), else a copy.
    """
    if t.is_contiguous():
        return t, t.shape[-1]
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


@functools.cache
def row_tile(n_cols: int, tile_elements: int, what: str) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for a kernel that holds whole rows of ``n_cols``.

    A tile is ``BLOCK_ROWS x BLOCK_COLS`` with about ``tile_elements`` elements: short
    rows (a 128-wide per-head norm) are packed several to a program so that each program
    moves enough bytes; rows of ``tile_elements`` or more get a program each.
    """
    block_cols = triton.next_power_of_2(n_cols)
    if block_cols > MAX_FUSED_SIZE:
        raise ValueError(
            f"loom.kernels: {what} of {n_cols} is larger than the {MAX_FUSED_SIZE} this "
            "kernel holds in one block; use backend='torch'"
        )
    block_rows = max(1, tile_elements // block_cols)
    return block_rows, block_cols, num_warps_for(block_rows * block_cols)


def num_warps_for(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_count(device: torch.device, work_items: int, per_sm: int = 1) -> int:
    """Persistent-kernel grid size: ``per_sm`` programs per SM on CUDA, a few under the
    interpreter; never more than ``work_items``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = _sm_count(index) * per_sm
    else:
        limit = 4
    return max(1, min(work_items, limit))
