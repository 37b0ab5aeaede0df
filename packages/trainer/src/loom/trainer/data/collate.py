"""Rows to tensors: a micro-batch of rows and the sample boundaries of its whole rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loom.models.vlm import image_shards
from loom.trainer.data.packing import MEDIA, Row


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


@dataclass(frozen=True)
class VisionTokens:
    """What the host needs of a vision-language model's config to lay out its inputs."""

    image: int  # placeholder token ids
    video: int
    merge: int  # spatial merge size: merge**2 patches make one feature

    @classmethod
    def of(cls, config) -> VisionTokens | None:
        if getattr(config, "vision_config", None) is None:
            return None
        merge = config.vision_config.spatial_merge_size
        return cls(config.image_token_id, config.video_token_id, merge)


def vision_inputs(rows: list[Row], tokens: VisionTokens, sp_rank: int, sp_size: int) -> dict:
    """The micro-batch's patches and grids per modality (whole, on every SP rank), which
    the vision tower takes together, images then videos; ``vision_slices[modality]``:
    which of those joint features fill the placeholders of this rank's slice of the rows,
    in the slice's order; under SP, ``vision_shards``: which items (images, then videos)
    each rank's vision tower runs on (``loom.models.vlm.image_shards``). Empty dict for
    rows without images or videos."""
    ids = np.stack([r.input_ids for r in rows])
    width = ids.shape[1] // sp_size
    part = slice(sp_rank * width, (sp_rank + 1) * width)
    out, slices, patches, features = {}, {}, [], []
    for modality, (pixels_key, grids_key) in MEDIA.items():
        found = [r.vision for r in rows if len(getattr(r.vision, grids_key))]
        if not found:
            continue
        grids = np.concatenate([getattr(v, grids_key) for v in found])
        counts = grids.prod(axis=1) // tokens.merge**2
        is_token = ids == getattr(tokens, modality)
        if int(is_token.sum()) != int(counts.sum()):
            raise ValueError(
                f"{int(is_token.sum())} {modality} placeholders but {int(counts.sum())} "
                f"{modality} features from the micro-batch's grids"
            )
        order = np.cumsum(is_token.reshape(-1)).reshape(ids.shape) - 1 + sum(features)
        slices[modality] = torch.from_numpy(order[:, part][is_token[:, part]].astype(np.int64))
        out[pixels_key] = torch.from_numpy(np.concatenate([getattr(v, pixels_key) for v in found]))
        out[grids_key] = torch.from_numpy(grids)
        patches += grids.prod(axis=1).tolist()
        features += counts.tolist()
    if not out:
        return {}
    out["vision_slices"] = slices
    if sp_size > 1:
        out["vision_shards"] = image_shards(patches, features, sp_size)
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
