"""Launch settings shared by the Triton kernels of loom.kernels."""

from __future__ import annotations

import functools

import torch
import triton

# One Triton program holds a whole row of this many elements at most (fp32 registers).
MAX_FUSED_SIZE = 65536


def row_block(n_cols: int, what: str) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one row of ``n_cols`` in one block."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(
            f"loom.kernels: {what} of {n_cols} is larger than the {MAX_FUSED_SIZE} this "
            "kernel holds in one block; use backend='torch'"
        )
    return block, num_warps_for(block)


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


def program_count(device: torch.device, work_items: int) -> int:
    """Persistent-kernel grid size: one program per SM on CUDA, a few under the interpreter."""
    limit = _sm_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(work_items, limit))
