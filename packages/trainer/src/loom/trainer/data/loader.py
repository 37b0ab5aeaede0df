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
from loom.trainer.data.packing import Ref, Row, build_row, pack_greedy

BatchUnit = Literal["rows", "samples"]


class BatchLoader:
    def __init__(
        self,
        tables: list[datasets.Dataset],
        weights: list[float],
        splittable: list[bool],
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
        self.splittable = splittable
        self.pending: list[Ref] = []
        self.step = 0

    def _fetch(self, ref: Ref) -> tuple[np.ndarray, np.ndarray]:
        source, index, offset = ref
        sample = self.tables[source][index]
        ids, labels = sample["input_ids"][offset:], sample["labels"][offset:]
        return ids.astype(np.int64), labels.astype(np.int64)

    def _draw(self) -> Ref:
        return (*self.mixture.next(), 0)

    def next_batch(self, rows_multiple: int = 1) -> list[Row]:
        """The next global batch; padded with empty rows to a multiple of ``rows_multiple``
        (the data-parallel size times the micro-batch size) when counted in samples."""
        count = {"n_rows" if self.unit == "rows" else "n_samples": self.batch_size}
        rows, self.pending = pack_greedy(
            self._draw,
            self._fetch,
            lambda ref: self.splittable[ref[0]],
            self.pending,
            self.row_len,
            self.pad_id,
            **count,
        )
        while len(rows) % rows_multiple:
            rows.append(build_row([], self.row_len, self.pad_id))
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
