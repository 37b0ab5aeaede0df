"""Batches with images and videos for the vision-language suites: rows of samples, each
sample some text, then per image ``<vision_start>``, its placeholder tokens,
``<vision_end>``, then more text; a video as its family's processor lays it out (Qwen2.5-VL:
one run of placeholders; Qwen3-VL: a run per frame, each after a timestamp's text tokens);
labels shifted within samples (none on placeholders); the 3-D rotary positions from
``loom.models.vlm_positions`` with the text positions prepended (the ``[4, batch, seq]``
layout both majors' text decoders take)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import transformers

from loom.models.vlm_positions import mrope_positions, video_time_scales

MAJOR = int(transformers.__version__.split(".")[0])
# Per row: one tuple per sample, each a list of image grids (t, h, w) in patches.
ROWS = (([(1, 4, 4), (1, 2, 4)],), ([(1, 4, 2)], []))
# Seconds per temporal patch of every video (Qwen2.5-VL places frames by it).
SECONDS_PER_GRID = 2.0


@dataclass(frozen=True)
class Video:
    """A video's grid in patches, in a sample's list among the image grids."""

    t: int
    h: int
    w: int


@dataclass
class VlmBatch:
    input_ids: torch.Tensor  # [rows, seq]
    labels: torch.Tensor  # [rows, seq], shifted
    position_ids: torch.Tensor  # [4, rows, seq]
    pixel_values: torch.Tensor | None  # [patches, width]
    image_grid_thw: torch.Tensor | None  # [images, 3]
    lengths: list[list[int]]  # per row, its samples' lengths
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def port_inputs(self) -> dict:
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }
        if self.video_grid_thw is not None:
            inputs["pixel_values_videos"] = self.pixel_values_videos
            inputs["video_grid_thw"] = self.video_grid_thw
        return inputs

    def upstream_inputs(self, config) -> dict:
        """v5 computes the positions itself from the token types (an independent check of
        Loom's); v4 is given them: 4.57.3 computing them takes the temporal axis for text
        positions and its mask builder then splits each sample at every image."""
        inputs = {k: v for k, v in self.port_inputs().items() if k != "position_ids"}
        if self.video_grid_thw is not None and _whole_video_run(config):
            inputs["second_per_grid_ts"] = torch.full((len(self.video_grid_thw),), SECONDS_PER_GRID)
        if MAJOR >= 5:
            inputs["mm_token_type_ids"] = token_types(self.input_ids, config)
        else:
            inputs["position_ids"] = self.position_ids
        return inputs


def token_types(ids: torch.Tensor, config) -> torch.Tensor:
    """v5's ``mm_token_type_ids``: 1 on image placeholders, 2 on video placeholders."""
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


def _whole_video_run(config) -> bool:
    """Qwen2.5-VL puts a video's placeholders in one run (Qwen3-VL: one per frame)."""
    return config.model_type.startswith("qwen2_5")


def _sample(config, grids, gen, text_before=3, text_after=4) -> torch.Tensor:
    merge = config.vision_config.spatial_merge_size

    def run(token: int, n: int) -> list[torch.Tensor]:
        start, end = config.vision_start_token_id, config.vision_end_token_id
        return [torch.tensor([start]), torch.full((n,), token), torch.tensor([end])]

    parts = []
    for item in grids:
        parts.append(torch.randint(0, 200, (text_before,), generator=gen))
        if not isinstance(item, Video):
            t, h, w = item
            parts += run(config.image_token_id, t * h * w // merge**2)
        elif _whole_video_run(config):
            parts += run(config.video_token_id, item.t * item.h * item.w // merge**2)
        else:
            for _ in range(item.t):  # a timestamp's tokens, then the frame
                parts.append(torch.randint(0, 200, (2,), generator=gen))
                parts += run(config.video_token_id, item.h * item.w // merge**2)
    parts.append(torch.randint(0, 200, (text_after + 2 * len(grids),), generator=gen))
    return torch.cat(parts)


def _positions(config, ids: torch.Tensor, grids: list) -> np.ndarray:
    images = [g for g in grids if not isinstance(g, Video)]
    videos = [(v.t, v.h, v.w) for v in grids if isinstance(v, Video)]
    scales = None
    if videos and _whole_video_run(config):
        tokens_per_second = config.vision_config.tokens_per_second
        scales = video_time_scales([SECONDS_PER_GRID] * len(videos), tokens_per_second)
    return mrope_positions(
        ids.numpy(),
        np.array(images).reshape(-1, 3) if images else None,
        np.array(videos).reshape(-1, 3) if videos else None,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=config.vision_config.spatial_merge_size,
        video_temporal_scale=scales,
    )


def vlm_batch(config, rows=ROWS, seed: int = 0, pad_to: int | None = None) -> VlmBatch:
    """Rows of the samples in ``rows``; every row padded to the longest (or ``pad_to``)
    with text-position pieces that predict nothing."""
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    samples = [[(_sample(config, grids, gen), grids) for grids in row] for row in rows]
    seq = pad_to or max(sum(len(ids) for ids, _ in row) for row in samples)
    ids_rows, label_rows, pos_rows, all_grids, lengths = [], [], [], [], []
    video_grids = []
    for row in samples:
        ids_parts, label_parts, pos_parts = [], [], []
        for ids, grids in row:
            labels = torch.cat([ids[1:], torch.tensor([-100])])
            labels[labels == config.image_token_id] = -100
            labels[labels == config.video_token_id] = -100
            pos = _positions(config, ids, grids)
            text = np.arange(len(ids))[None]
            ids_parts.append(ids)
            label_parts.append(labels)
            pos_parts.append(torch.from_numpy(np.concatenate([text, pos])))
            all_grids += [g for g in grids if not isinstance(g, Video)]
            video_grids += [(g.t, g.h, g.w) for g in grids if isinstance(g, Video)]
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
    video_grid = torch.tensor(video_grids) if video_grids else None
    video_pixels = None
    if video_grid is not None:
        video_pixels = torch.randn(int(video_grid.prod(-1).sum()), width, generator=gen)
    return VlmBatch(
        torch.stack(ids_rows),
        torch.stack(label_rows),
        torch.stack(pos_rows, dim=1),
        pixels,
        grid,
        lengths,
        video_pixels,
        video_grid,
    )
