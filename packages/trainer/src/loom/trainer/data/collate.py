"""Rows to tensors: a micro-batch of rows and the sample boundaries of its whole rows."""

from __future__ import annotations

import numpy as np
import torch

from loom.models.vlm import image_shards
from loom.models.vlm_positions import token_runs
from loom.trainer.data.packing import Row


def stack_rows(rows: list[Row]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids``: [rows, row_len] int64 tensors; rows with
    images give ``position_ids`` [4, rows, row_len] (the text positions, then the three
    rotary axes), sequence last as everywhere."""
    batch = {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "position_ids": torch.from_numpy(np.stack([r.position_ids for r in rows])),
    }
    if rows[0].vision is not None:
        mrope = torch.from_numpy(np.stack([r.vision.mrope for r in rows], axis=1))
        batch["position_ids"] = torch.cat([batch["position_ids"][None], mrope])
    return batch


def vision_inputs(rows: list[Row], image_token_id: int, sp_rank: int, sp_size: int) -> dict:
    """The micro-batch's patches and grids (whole, on every SP rank); ``vision_slices``:
    which of their features fill the image placeholders of this rank's slice of the rows,
    in the slice's order; under SP, ``vision_shards``: which images each rank's vision
    tower runs on (``loom.models.vlm.image_shards``). Empty dict for rows without images."""
    with_images = [r.vision for r in rows if len(r.vision.image_grid_thw)]
    if not with_images:
        return {}
    ids = np.stack([r.input_ids for r in rows])
    is_image = ids == image_token_id
    order = np.cumsum(is_image.reshape(-1)).reshape(ids.shape) - 1  # row-major feature order
    width = ids.shape[1] // sp_size
    part = slice(sp_rank * width, (sp_rank + 1) * width)
    index = order[:, part][is_image[:, part]]
    grids = np.concatenate([v.image_grid_thw for v in with_images])
    out = {
        "pixel_values": torch.from_numpy(np.concatenate([v.pixel_values for v in with_images])),
        "image_grid_thw": torch.from_numpy(grids),
        "vision_slices": {"image": torch.from_numpy(index.astype(np.int64))},
    }
    if sp_size > 1:
        features = [end - start for start, end in token_runs(ids.reshape(-1), image_token_id)]
        if len(features) != len(grids):
            raise ValueError(
                f"{len(features)} runs of image placeholders but {len(grids)} images in the "
                "micro-batch: images must be separated by other tokens"
            )
        patches = grids.prod(axis=1).tolist()
        out["vision_shards"] = {"image": image_shards(patches, features, sp_size)}
    return out


def boundaries(rows: list[Row]) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the rows flattened back to back ([rows * row_len] tokens), and the
    longest sample: what varlen attention needs for the whole, unsliced rows."""
    offsets, parts = 0, [np.zeros(1, dtype=np.int64)]
    for row in rows:
        parts.append(row.cu_seqlens[1:].astype(np.int64) + offsets)
        offsets += len(row.input_ids)
    cu = np.concatenate(parts)
    return torch.from_numpy(cu.astype(np.int32)), int(np.diff(cu).max())
