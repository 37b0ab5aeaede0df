"""Global batches of packed rows, the same for every world size, and resumable.

Every rank builds the whole global batch (packing is cheap next to a training step) and
keeps its own share, so no data crosses processes and any layout of data-parallel ranks
sees the same rows.
"""

from __future__ import annotations

from typing import Any, Literal

import datasets
import numpy as np

from loom.trainer.data.mixture import Mixture
from loom.trainer.data.packing import Row, build_row, pack_greedy

BatchUnit = Literal["rows", "samples"]


class BatchLoader:
    def __init__(
        self,
        tables: list[datasets.Dataset],
        weights: list[float],
        seed: int,
        row_len: int,
        pad_id: int,
        batch_size: int,
        unit: BatchUnit = "rows",
    ) -> None:
        self.tables = [t.with_format("numpy") for t in tables]
        self.mixture = Mixture([len(t) for t in tables], weights, seed)
        self.row_len, self.pad_id = row_len, pad_id
        self.batch_size, self.unit = batch_size, unit
        self.pending: list[tuple[int, int]] = []
        self.step = 0

    def _fetch(self, ref: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        sample = self.tables[ref[0]][ref[1]]
        return sample["input_ids"].astype(np.int64), sample["labels"].astype(np.int64)

    def _next_sample(self):
        ref = self.pending.pop(0) if self.pending else self.mixture.next()
        return (ref, *self._fetch(ref))

    def next_batch(self, rows_multiple: int = 1) -> list[Row]:
        """The next global batch; padded with empty rows to a multiple of ``rows_multiple``
        (the data-parallel size times the micro-batch size) when counted in samples."""
        if self.unit == "rows":
            rows, left = pack_greedy(
                self._next_sample, self.batch_size, None, self.row_len, self.pad_id
            )
        else:
            rows, left = pack_greedy(
                self._next_sample, None, self.batch_size, self.row_len, self.pad_id
            )
            while len(rows) % rows_multiple:
                rows.append(build_row([], self.row_len, self.pad_id))
        self.pending = left + self.pending
        self.step += 1
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": self.mixture.state_dict(),
            "pending": [list(r) for r in self.pending],
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.pending = [tuple(r) for r in state["pending"]]
        self.step = state["step"]
