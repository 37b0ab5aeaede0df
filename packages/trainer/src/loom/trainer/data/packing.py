"""Pack samples into rows: several samples back to back, position ids restarting at each.

A row is what one forward pass sees on one rank (batch dimension 1): ``input_ids``,
``labels`` and ``position_ids`` of length ``row_len`` (padding at the end has label
``IGNORE_INDEX``), and ``cu_seqlens``, the sample boundaries for varlen attention.
Samples of a vision-language source bring their images and videos (``Vision``): the row
then also holds the 3-D rotary positions of every token and its samples' patches and grids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loom.trainer.data.samples import IGNORE_INDEX


def _no_grids() -> np.ndarray:
    return np.zeros((0, 3), np.int64)


def _no_pixels() -> np.ndarray:
    return np.zeros((0, 0), np.float32)


@dataclass
class Vision:
    """A sample's images and videos: 3-D rotary positions of its tokens, patches and grids
    (named as the model's keyword arguments)."""

    mrope: np.ndarray  # [3, tokens] int64
    pixel_values: np.ndarray  # [patches, channels * temporal patch * patch ** 2] float32
    image_grid_thw: np.ndarray  # [images, 3] int64
    pixel_values_videos: np.ndarray = field(default_factory=_no_pixels)  # [patches, width]
    video_grid_thw: np.ndarray = field(default_factory=_no_grids)  # [videos, 3] int64


# Per modality, the names of its patches and grids in ``Vision`` and the model's forward.
MEDIA = {
    "image": ("pixel_values", "image_grid_thw"),
    "video": ("pixel_values_videos", "video_grid_thw"),
}


@dataclass
class Row:
    input_ids: np.ndarray  # [row_len] int64
    labels: np.ndarray  # [row_len] int64
    position_ids: np.ndarray  # [row_len] int64
    cu_seqlens: np.ndarray  # [pieces + 1] int32: the samples, then the padding's pieces
    vision: Vision | None = None  # the row's, when its source has images
    padding: int = 0  # tokens after the samples

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def build_row(samples: list[tuple], row_len: int, pad_id: int, vision: bool = False) -> Row:
    """Concatenate ``samples`` (each ``(ids, labels)``, or ``(ids, labels, Vision)``) and
    pad to ``row_len``; ``vision``: give the row a ``Vision`` even without samples.

    The padding attends in pieces no longer than the row's longest sample: no piece of
    attention is then longer than a real sample, so a check of sample lengths against a
    sliding window sees real lengths only (the padding's outputs count for nothing)."""
    lengths = [len(s[0]) for s in samples]
    used = sum(lengths)
    if used > row_len:
        raise ValueError(f"samples of {used} tokens do not fit a row of {row_len}")
    pad = row_len - used
    piece = max(lengths, default=0) or row_len
    pieces = [piece] * (pad // piece) + ([pad % piece] if pad % piece else [])
    ids = np.concatenate([s[0] for s in samples] + [np.full(pad, pad_id)]).astype(np.int64)
    labels = np.concatenate([s[1] for s in samples] + [np.full(pad, IGNORE_INDEX)])
    position_ids = np.concatenate([np.arange(n) for n in lengths + pieces])
    bounds = np.cumsum([0, *lengths, *pieces])
    row = Row(ids, labels.astype(np.int64), position_ids.astype(np.int64), bounds.astype(np.int32))
    row.padding = pad
    if vision or any(len(s) > 2 for s in samples):
        row.vision = _row_vision(samples, pieces)
    return row


def _row_vision(samples: list[tuple], pieces: list[int]) -> Vision:
    """The samples' ``Vision`` back to back; text-only samples and padding advance the
    three rotary axes together."""
    parts = [s[2] if len(s) > 2 else None for s in samples]
    mrope = [p.mrope if p else np.tile(np.arange(len(s[0])), (3, 1)) for p, s in zip(parts, samples, strict=True)]  # fmt: skip
    mrope += [np.tile(np.arange(n), (3, 1)) for n in pieces]
    media = {}
    for pixels, grids in MEDIA.values():
        found = [p for p in parts if p is not None and len(getattr(p, grids))]
        if found:
            media[pixels] = np.concatenate([getattr(p, pixels) for p in found])
            media[grids] = np.concatenate([getattr(p, grids) for p in found])
    media.setdefault("pixel_values", _no_pixels())
    media.setdefault("image_grid_thw", _no_grids())
    return Vision(np.concatenate(mrope, axis=1).astype(np.int64), **media)


# (source, index or a stream's sample key, offset of the first token still to pack)
Ref = tuple[int, Any, int]


def pack_greedy(
    draw: Callable[[], Ref],
    fetch: Callable[[Ref], tuple],
    can_split: Callable[[Ref], bool],
    pending: list[Ref],
    row_len: int,
    pad_id: int,
    n_rows: int | None = None,
    n_samples: int | None = None,
    vision: bool = False,
) -> tuple[list[Row], list[Ref]]:
    """Fill rows in order: first the ``pending`` refs, then ``draw()``.

    A sample that does not fit the row being filled either fills it and continues in the
    next row (``can_split``: plain text, where nothing ties the pieces together) or
    starts the next row whole (chat: a conversation is never cut here; ``split_long``
    has already cut those longer than a row). Stops after ``n_rows`` rows, or after
    ``n_samples`` new samples; ``vision``: every row holds a ``Vision`` (a vision-language
    run). Returns the rows and the refs to take first next time.
    """
    queue, rows, current, used, taken = list(pending), [], [], 0, 0
    while True:
        if not queue and n_samples is not None and taken == n_samples:
            if current:
                rows.append(build_row(current, row_len, pad_id, vision))
            return rows, []
        if not queue:
            queue.append(draw())
            taken += 1
        ref = queue.pop(0)
        sample = fetch(ref)
        ids, labels = sample[0], sample[1]
        space = row_len - used
        if len(ids) > space and current:
            if can_split(ref) and space > 0:
                current.append((ids[:space], labels[:space]))
                queue.insert(0, (ref[0], ref[1], ref[2] + space))
            else:
                queue.insert(0, ref)
            rows.append(build_row(current, row_len, pad_id, vision))
            current, used = [], 0
            if len(rows) == n_rows:
                return rows, queue
            continue
        current.append(sample)
        used += len(ids)
