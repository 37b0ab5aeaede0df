"""Rows to tensors: stack micro-batches and, under sequence parallelism, slice per rank."""

from __future__ import annotations

import numpy as np
import torch

from loom.trainer.data.packing import Row
from loom.trainer.data.samples import IGNORE_INDEX


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


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_id: int):
    """Pad the sequence dimension to a multiple of ``multiple`` (the SP size). Padding
    tokens carry no loss, and their position ids continue as one more short sample."""
    length = batch["input_ids"].shape[1]
    pad = -length % multiple
    if not pad:
        return batch
    rows = batch["input_ids"].shape[0]
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    out = {k: torch.cat([v, v.new_full((rows, pad), fill.get(k, 0))], 1) for k, v in batch.items()}
    out["position_ids"][:, length:] = torch.arange(pad)
    return out


def sp_slice(batch: dict[str, torch.Tensor], sp_rank: int, sp_size: int) -> dict[str, torch.Tensor]:
    """This SP rank's contiguous slice of the sequence. Labels were shifted per sample
    before packing, so each slice carries the right targets without its neighbours."""
    length = batch["input_ids"].shape[1]
    if length % sp_size:
        raise ValueError(f"sequence length {length} is not a multiple of sp={sp_size}; pad first")
    chunk = length // sp_size
    return {k: v[:, sp_rank * chunk : (sp_rank + 1) * chunk] for k, v in batch.items()}
