"""Batches with images for the vision-language suites: rows of samples, each sample some
text, then per image ``<vision_start>``, its placeholder tokens, ``<vision_end>``, then
more text; labels shifted within samples (none on placeholders); the 3-D rotary
positions from ``loom.models.vlm_positions`` with the text positions prepended (the
``[4, batch, seq]`` layout both majors' text decoders take)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import transformers

from loom.models.vlm_positions import mrope_positions

MAJOR = int(transformers.__version__.split(".")[0])
# Per row: one tuple per sample, each a list of image grids (t, h, w) in patches.
ROWS = (([(1, 4, 4), (1, 2, 4)],), ([(1, 4, 2)], []))


@dataclass
class VlmBatch:
    input_ids: torch.Tensor  # [rows, seq]
    labels: torch.Tensor  # [rows, seq], shifted
    position_ids: torch.Tensor  # [4, rows, seq]
    pixel_values: torch.Tensor | None  # [patches, width]
    image_grid_thw: torch.Tensor | None  # [images, 3]
    lengths: list[list[int]]  # per row, its samples' lengths

    def port_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    def upstream_inputs(self, config) -> dict:
        """v5 computes the positions itself from the token types (an independent check of
        Loom's); v4 is given them: 4.57.3 computing them takes the temporal axis for text
        positions and its mask builder then splits each sample at every image."""
        inputs = {k: v for k, v in self.port_inputs().items() if k != "position_ids"}
        if MAJOR >= 5:
            inputs["mm_token_type_ids"] = (self.input_ids == config.image_token_id).int()
        else:
            inputs["position_ids"] = self.position_ids
        return inputs


def _sample(config, grids, gen, text_before=3, text_after=4) -> torch.Tensor:
    merge = config.vision_config.spatial_merge_size
    parts = []
    for t, h, w in grids:
        parts += [
            torch.randint(0, 200, (text_before,), generator=gen),
            torch.tensor([config.vision_start_token_id]),
            torch.full((t * h * w // merge**2,), config.image_token_id),
            torch.tensor([config.vision_end_token_id]),
        ]
    parts.append(torch.randint(0, 200, (text_after + 2 * len(grids),), generator=gen))
    return torch.cat(parts)


def vlm_batch(config, rows=ROWS, seed: int = 0, pad_to: int | None = None) -> VlmBatch:
    """Rows of the samples in ``rows``; every row padded to the longest (or ``pad_to``)
    with text-position pieces that predict nothing."""
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    samples = [[(_sample(config, grids, gen), grids) for grids in row] for row in rows]
    seq = pad_to or max(sum(len(ids) for ids, _ in row) for row in samples)
    ids_rows, label_rows, pos_rows, all_grids, lengths = [], [], [], [], []
    for row in samples:
        ids_parts, label_parts, pos_parts = [], [], []
        for ids, grids in row:
            labels = torch.cat([ids[1:], torch.tensor([-100])])
            labels[labels == config.image_token_id] = -100
            pos = mrope_positions(
                ids.numpy(),
                np.array(grids).reshape(-1, 3) if grids else None,
                None,
                image_token_id=config.image_token_id,
                video_token_id=config.video_token_id,
                spatial_merge_size=vision.spatial_merge_size,
            )
            text = np.arange(len(ids))[None]
            ids_parts.append(ids)
            label_parts.append(labels)
            pos_parts.append(torch.from_numpy(np.concatenate([text, pos])))
            all_grids += grids
        pad = seq - sum(len(i) for i in ids_parts)
        lengths.append([len(i) for i in ids_parts] + ([pad] if pad else []))
        ids_parts.append(torch.zeros(pad, dtype=torch.long))
        label_parts.append(torch.full((pad,), -100))
        pos_parts.append(torch.arange(pad).expand(4, pad))
        ids_rows.append(torch.cat(ids_parts))
        label_rows.append(torch.cat(label_parts))
        pos_rows.append(torch.cat(pos_parts, dim=1))
    grid = torch.tensor(all_grids) if all_grids else None
    pixels = None
    if grid is not None:
        pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=gen)
    return VlmBatch(
        torch.stack(ids_rows),
        torch.stack(label_rows),
        torch.stack(pos_rows, dim=1),
        pixels,
        grid,
        lengths,
    )
