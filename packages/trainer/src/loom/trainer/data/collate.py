"""Rows to tensors: a micro-batch of rows and the sample boundaries of its whole rows."""

from __future__ import annotations

import numpy as np
import torch

from loom.trainer.data.packing import Row


def stack_rows(rows: list[Row]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids``: [rows, row_len] int64 tensors."""
    return {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "position_ids": torch.from_numpy(np.stack([r.position_ids for r in rows])),
    }


def boundaries(rows: list[Row]) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the rows flattened back to back ([rows * row_len] tokens), and the
    longest sample: what varlen attention needs for the whole, unsliced rows."""
    offsets, parts = 0, [np.zeros(1, dtype=np.int64)]
    for row in rows:
        parts.append(row.cu_seqlens[1:].astype(np.int64) + offsets)
        offsets += len(row.input_ids)
    cu = np.concatenate(parts)
    return torch.from_numpy(cu.astype(np.int32)), int(np.diff(cu).max())
