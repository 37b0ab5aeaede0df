"""3-D rotary positions (Qwen's multimodal RoPE) of one sample, computed in the data
pipeline: module-level and numpy-only, so data-loader workers can pickle it, and done on
the whole sample before sequence parallelism slices it (positions computed from a slice
would be wrong).

Text tokens advance all three axes together; the tokens of an image (or a video frame)
take its temporal index and its row and column on the merged grid, offset by where the
image starts, and the text after it resumes at one past the largest position used.
This is upstream's ``get_rope_index`` (Qwen2.5-VL, Qwen3-VL) for one sample, as the
installed transformers computes it: the majors differ for Qwen2.5-VL's videos of more than
one temporal patch (``RESUME_AFTER_SPATIAL``).
"""

from __future__ import annotations

import numpy as np
import transformers

# 5.x resumes the text after a vision run at its start plus its larger spatial side, even
# when a video's temporal positions reach further; 4.x after the largest position. The
# same for images and single frames.
RESUME_AFTER_SPATIAL = int(transformers.__version__.split(".")[0]) >= 5


def video_time_scales(seconds_per_grid: list[float], tokens_per_second: float) -> list[float]:
    """Qwen2.5-VL's spacing of a video's temporal patches on the temporal axis, per video:
    ``tokens_per_second`` times the seconds per patch truncated to whole seconds (both
    majors cast them to the positions' integer dtype first)."""
    return [float(int(s) * tokens_per_second) for s in seconds_per_grid]


def token_runs(ids: np.ndarray, token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of ``token_id``."""
    hit = np.concatenate([[False], ids == token_id, [False]])
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def mrope_positions(
    ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    video_temporal_scale: list[float] | None = None,
) -> np.ndarray:
    """[3, len(ids)] int64 positions of one sample.

    ``video_temporal_scale``: Qwen2.5-VL's spacing of temporal patches per video
    (``video_time_scales``; a video is one run of placeholders); None for
    Qwen3-VL, whose frames are separate runs (timestamps in between), each placed like an
    image.
    """
    grids = []  # (start, end, t, h, w, temporal scale) of every vision run, in order
    for token_id, grid_thw, is_video in (
        (image_token_id, image_grid_thw, False),
        (video_token_id, video_grid_thw, True),
    ):
        runs = token_runs(ids, token_id)
        items = [] if grid_thw is None else [tuple(int(x) for x in g) for g in grid_thw]
        scales = [1.0] * len(items)
        if is_video and video_temporal_scale is None:  # one run per frame
            items = [(1, h, w) for t, h, w in items for _ in range(t)]
            scales = [0.0] * len(items)
        elif is_video:
            scales = list(video_temporal_scale)
        if len(runs) != len(items):
            kind = "video" if is_video else "image"
            raise ValueError(
                f"{len(runs)} runs of {kind} placeholder tokens but {len(items)} {kind} grids"
            )
        for (start, end), (t, h, w), scale in zip(runs, items, scales, strict=True):
            h, w = h // spatial_merge_size, w // spatial_merge_size
            if end - start != t * h * w:
                raise ValueError(
                    f"a run of {end - start} placeholder tokens for a grid of {t}x{h}x{w} "
                    "merged patches"
                )
            grids.append((start, end, t, h, w, scale))
    grids.sort()
    out = np.empty((3, len(ids)), dtype=np.int64)
    cursor, next_pos = 0, 0
    for start, end, t, h, w, scale in grids:
        out[:, cursor:start] = np.arange(start - cursor) + next_pos
        base = next_pos + start - cursor
        tt, hh, ww = np.meshgrid(
            (np.arange(t) * scale).astype(np.int64), np.arange(h), np.arange(w), indexing="ij"
        )
        out[:, start:end] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + base
        resume = base + max(h, w) if RESUME_AFTER_SPATIAL else int(out[:, start:end].max()) + 1
        cursor, next_pos = end, resume
    out[:, cursor:] = np.arange(len(ids) - cursor) + next_pos
    return out
