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
from loom.trainer.data.multimodal import VlmSource
from loom.trainer.data.packing import Ref, Row, build_row, pack_greedy
from loom.trainer.data.streaming import StreamSource

BatchUnit = Literal["rows", "samples"]


class BatchLoader:
    """``sources``: tokenized tables (in memory), streaming sources or (a vision-language
    run) chat sources with images, in any mix."""

    def __init__(
        self,
        sources: list[datasets.Dataset | StreamSource | VlmSource],
        vision: bool = False,
        *,
        weights: list[float],
        splittable: list[bool],
        seed: int,
        row_len: int,
        pad_id: int,
        batch_size: int,
        unit: BatchUnit = "rows",
    ) -> None:
        self.sources = [
            s.with_format("numpy") if isinstance(s, datasets.Dataset) else s for s in sources
        ]
        self.vision = vision
        self.streams = {i: s for i, s in enumerate(self.sources) if isinstance(s, StreamSource)}
        sizes = [None if i in self.streams else len(s) for i, s in enumerate(self.sources)]
        self.mixture = Mixture(sizes, weights, seed)
        self.row_len, self.pad_id = row_len, pad_id
        self.batch_size, self.unit = batch_size, unit
        self.splittable = splittable
        self.pending: list[Ref] = []
        self.step = 0

    def _fetch(self, ref: Ref) -> tuple:
        source, key, offset = ref
        if isinstance(self.sources[source], VlmSource):
            return self.sources[source].fetch(key)  # never split: offset is 0
        if source in self.streams:
            ids, labels = self.streams[source].fetch(key)
        else:
            sample = self.sources[source][key]
            ids, labels = sample["input_ids"], sample["labels"]
        return ids[offset:].astype(np.int64), labels[offset:].astype(np.int64)

    def _draw(self) -> Ref:
        source, index = self.mixture.next()
        return source, self.streams[source].next() if index is None else index, 0

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
            vision=self.vision,
        )
        while len(rows) % rows_multiple:
            rows.append(build_row([], self.row_len, self.pad_id, self.vision))
        self.step += 1
        return rows

    @property
    def epoch(self) -> float:
        """Epochs of the first source completed, as a fraction (for progress reports)."""
        return self.streams[0].epoch if 0 in self.streams else self.mixture.epoch

    @property
    def skipped_records(self) -> int:
        """Bad records the streaming sources passed over so far (``strict: false``)."""
        return sum(s.skipped for s in self.streams.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": self.mixture.state_dict(),
            "streams": {str(i): s.state_dict() for i, s in self.streams.items()},
            "pending": [
                [r[0], list(r[1]) if r[0] in self.streams else r[1], r[2]] for r in self.pending
            ],
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state["mixture"])  # checks which sources stream, too
        for i, stream in self.streams.items():
            stream.load_state_dict(state["streams"][str(i)])
        self.pending = [
            (r[0], tuple(r[1]) if r[0] in self.streams else r[1], r[2]) for r in state["pending"]
        ]
        self.step = state["step"]
