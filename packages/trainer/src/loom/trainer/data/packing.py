"""Pack samples into rows: several samples back to back, position ids restarting at each.

A row is what one forward pass sees on one rank (batch dimension 1): ``input_ids``,
``labels`` and ``position_ids`` of length ``row_len`` (padding at the end has label
``IGNORE_INDEX``), and ``cu_seqlens``, the sample boundaries for varlen attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loom.trainer.data.samples import IGNORE_INDEX


@dataclass
class Row:
    input_ids: np.ndarray  # [row_len] int64
    labels: np.ndarray  # [row_len] int64
    position_ids: np.ndarray  # [row_len] int64
    cu_seqlens: np.ndarray  # [samples + 1] int32, the padding counted as one more sample

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def build_row(samples: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int) -> Row:
    """Concatenate ``samples`` (each ``(ids, labels)``) and pad to ``row_len``."""
    lengths = [len(ids) for ids, _ in samples]
    used = sum(lengths)
    if used > row_len:
        raise ValueError(f"samples of {used} tokens do not fit a row of {row_len}")
    pad = row_len - used
    ids = np.concatenate([s[0] for s in samples] + [np.full(pad, pad_id)]).astype(np.int64)
    labels = np.concatenate([s[1] for s in samples] + [np.full(pad, IGNORE_INDEX)])
    position_ids = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])
    bounds = np.cumsum([0, *lengths, *([pad] if pad else [])])
    return Row(ids, labels.astype(np.int64), position_ids.astype(np.int64), bounds.astype(np.int32))


def pack_greedy(next_sample, n_rows: int | None, n_samples: int | None, row_len: int, pad_id: int):
    """Fill rows in order from ``next_sample()`` (which returns ``(ref, ids, labels)``).

    A sample that does not fit the row being filled starts the next one, so samples are
    never cut here (``split_long`` has already cut those longer than a row). Stop after
    ``n_rows`` rows, or after ``n_samples`` samples. Returns the rows and the refs drawn
    but not used (at most one), which the next call must take first.
    """
    rows, current, used, taken = [], [], 0, 0
    while True:
        if n_samples is not None and taken == n_samples:
            if current:
                rows.append(build_row(current, row_len, pad_id))
            return rows, []
        ref, ids, labels = next_sample()
        taken += 1
        if current and used + len(ids) > row_len:
            rows.append(build_row(current, row_len, pad_id))
            current, used = [], 0
            if len(rows) == n_rows:
                return rows, [ref]
        current.append((ids, labels))
        used += len(ids)
