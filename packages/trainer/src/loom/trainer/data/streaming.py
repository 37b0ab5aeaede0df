"""Streaming sources: JSON-lines or Parquet shards read record by record, tokenized as
they are read, shuffled through a seeded buffer, resumable at exactly the next sample.

For corpora too large to tokenize up front. Each epoch visits the shards in an order
drawn from the seed and the epoch, reads each record once, and passes its samples
through a buffer of ``shuffle_buffer`` samples: once the buffer is full, each draw
takes a random slot and the next sample read fills it (the streaming shuffle of
``datasets`` and ``tf.data``). ``shuffle_buffer: 0`` reads the shards in file order and
the records as they stand. The next epoch starts the stream again with new draws.

A checkpoint keeps no tokens: the epoch, the shard, the byte offset (JSON lines) or row
(Parquet) of the next record, the generator, and the *locations* of the samples held in
the buffer, which ``load_state_dict`` reads again. Files are read as plain files, not
through ``datasets.IterableDataset``, whose state leaves the shuffle buffer out.
"""

from __future__ import annotations

import bisect
import glob
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from loom.trainer.data.samples import Sample, encode_records
from loom.trainer.data.sources import Format, parse_jsonl_line, record_problem
from loom.trainer.errors import DataError

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet")
READ_CHUNK = 256  # records tokenized in one call
RECENT = 8  # samples drawn lately, kept for the packer (it fetches the last one again)

Key = tuple[int, int, int]  # (shard, offset of the record, piece of the record)


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def stream_shards(path: Path) -> list[Path]:
    """The shard files of a streaming source, sorted: one file, every ``.jsonl`` /
    ``.json`` / ``.parquet`` under a folder, or the files a glob pattern matches."""
    if glob.has_magic(str(path)):
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]
        shards = sorted(p for p in found if p.is_file() and p.suffix in SHARD_SUFFIXES)
        if not shards:
            raise DataError(f"{path}: the pattern matches no .jsonl, .json or .parquet file")
        return shards
    if not path.exists():
        raise DataError(f"data source {path} does not exist")
    if path.is_file():
        if path.suffix not in SHARD_SUFFIXES:
            raise DataError(f"streaming source {path}: expected .jsonl, .json or .parquet")
        return [path]
    if _is_saved_dataset(path):
        raise DataError(
            f"{path} is a datasets.save_to_disk folder, which streaming does not read; it is "
            "memory-mapped whole already, so set streaming: false"
        )
    shards = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SHARD_SUFFIXES)
    if not shards:
        raise DataError(f"{path}: the folder holds no .jsonl, .json or .parquet file")
    return shards


@dataclass
class Entry:
    """One record as read: where it is, and its field's value or why it is unusable."""

    offset: int  # byte offset of its line (JSON lines) or its row (Parquet)
    line: int  # its line, from 1 (JSON lines), or its row, from 0 (Parquet)
    end: int  # offset of what follows it
    value: Any
    problem: str | None


class JsonlShard:
    def __init__(self, path: Path, fmt: Format, field: str) -> None:
        self.path, self.fmt, self.field = path, fmt, field
        self.size = path.stat().st_size

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def entries(self, offset: int, line: int) -> Iterator[Entry]:
        """The records from ``offset`` (which starts line ``line``) to the end."""
        with self.path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                start, offset = offset, offset + len(raw)
                text = raw.decode("utf-8", errors="replace")
                if text.strip():
                    yield Entry(start, line, offset, *parse_jsonl_line(text, self.fmt, self.field))
                line += 1

    def value_at(self, offset: int) -> tuple[Any, str | None]:
        with self.path.open("rb") as f:
            f.seek(offset)
            text = f.readline().decode("utf-8", errors="replace")
        return parse_jsonl_line(text, self.fmt, self.field)

    def fraction(self, offset: int) -> float:
        return offset / max(self.size, 1)


class ParquetShard:
    """Read one row group at a time, only the field's column."""

    def __init__(self, path: Path, fmt: Format, field: str) -> None:
        self.path, self.fmt, self.field = path, fmt, field
        self.size = path.stat().st_size
        self._file, self._group = None, (-1, None)

    def _open(self):
        if self._file is None:
            import pyarrow.parquet as pq

            self._file = pq.ParquetFile(self.path)
            names = self._file.schema_arrow.names
            if self.field not in names:
                raise DataError(f'{self.path}: has no column "{self.field}" (columns: {names})')
            meta = self._file.metadata
            rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.starts = np.cumsum([0, *rows]).tolist()  # each group's first row, then the total
        return self._file

    def _column(self, group: int):
        if self._group[0] != group:
            table = self._open().read_row_group(group, columns=[self.field])
            self._group = (group, table.column(0))
        return self._group[1]

    def where(self, row: int) -> str:
        return f"{self.path}: row {row}"

    def _checked(self, value: Any) -> tuple[Any, str | None]:
        problem = record_problem({self.field: value}, self.fmt, self.field)
        return (None, problem) if problem else (value, None)

    def entries(self, offset: int, line: int) -> Iterator[Entry]:
        self._open()
        first_group = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        for group in range(first_group, len(self.starts) - 1):
            column, first = self._column(group), self.starts[group]
            for start in range(max(offset - first, 0), len(column), READ_CHUNK):
                for i, value in enumerate(column.slice(start, READ_CHUNK).to_pylist()):
                    row = first + start + i
                    yield Entry(row, row, row + 1, *self._checked(value))

    def value_at(self, row: int) -> tuple[Any, str | None]:
        self._open()
        group = bisect.bisect_right(self.starts, row) - 1
        return self._checked(self._column(group)[row - self.starts[group]].as_py())

    def fraction(self, row: int) -> float:
        self._open()
        return row / max(self.starts[-1], 1)


def open_shard(path: Path, fmt: Format, field: str) -> JsonlShard | ParquetShard:
    return (ParquetShard if path.suffix == ".parquet" else JsonlShard)(path, fmt, field)


def first_record_problem(path: Path, fmt: Format, field: str) -> str | None:
    """``where: problem`` when the first record of a streaming source cannot be trained
    on: a wrong field or format shows before any process starts, without a full scan."""
    shard = open_shard(stream_shards(path)[0], fmt, field)
    entry = next(shard.entries(0, 1), None)
    return f"{shard.where(entry.line)}: {entry.problem}" if entry and entry.problem else None


class StreamSource:
    """The samples of a streaming source, one at a time: ``next()`` gives a sample's key,
    ``fetch(key)`` its ids and labels."""

    def __init__(
        self,
        shards: list[Path],
        tokenizer,
        *,
        fmt: Format,
        field: str,
        max_len: int,
        strict: bool,
        shuffle_buffer: int,
        seed: tuple[int, ...],
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.shards = [open_shard(p, fmt, field) for p in shards]
        self.tokenizer, self.fmt, self.max_len = tokenizer, fmt, max_len
        self.strict, self.warn = strict, warn
        self.shuffle, self.capacity = shuffle_buffer > 0, max(shuffle_buffer, 1)
        self.seed = tuple(seed)
        self.skipped = 0  # bad records passed over (strict: false), all epochs
        self.buffer: list[tuple[Key, Sample]] = []
        self.recent: dict[Key, Sample] = {}
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch_index, self.cursor = epoch, 0  # cursor: into this epoch's shard order
        n = len(self.shards)
        rng = np.random.default_rng([*self.seed, epoch, 0])
        self.order = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        self.picker = np.random.default_rng([*self.seed, epoch, 1])
        self.position = (0, 1, 0)  # offset, line and piece of the next sample to buffer
        self.epoch_samples = 0
        self._entries: Iterator[Entry] | None = None
        self._staged: deque[tuple[Entry, list[Sample]]] = deque()

    def _encode(self, values: list) -> list[list[Sample]]:
        return encode_records(self.tokenizer, self.fmt, values, self.max_len)

    def _stage(self) -> bool:
        """Read and tokenize the next records; False once this epoch's shards are done."""
        while self.cursor < len(self.order):
            if self._entries is None:
                offset, line, _ = self.position
                self._entries = self.shards[self.order[self.cursor]].entries(offset, line)
            chunk = list(islice(self._entries, READ_CHUNK))
            if chunk:
                encoded = iter(self._encode([e.value for e in chunk if e.problem is None]))
                self._staged.extend((e, [] if e.problem else next(encoded)) for e in chunk)
                return True
            self.cursor, self._entries, self.position = self.cursor + 1, None, (0, 1, 0)
        return False

    def _skip(self, entry: Entry) -> None:
        where = self.shards[self.order[self.cursor]].where(entry.line)
        if self.strict:
            raise DataError(f"{where}: {entry.problem}")
        self.skipped += 1
        if self.skipped == 1 and self.warn:
            self.warn(
                f"{where}: {entry.problem}; skipped (data.strict is false), as later bad "
                "records will be: metrics.jsonl counts them in skipped_records"
            )

    def _fill(self) -> None:
        """Buffer samples up to capacity, or until this epoch's records are all read."""
        while len(self.buffer) < self.capacity and (self._staged or self._stage()):
            entry, samples = self._staged[0]
            piece = self.position[2]
            if entry.problem is not None:
                self._skip(entry)
            elif piece < len(samples):
                self.buffer.append(((self.order[self.cursor], entry.offset, piece), samples[piece]))
                self.epoch_samples += 1
                if piece + 1 < len(samples):  # a record longer than a row: its next piece
                    self.position = (entry.offset, entry.line, piece + 1)
                    continue
            self._staged.popleft()
            self.position = (entry.end, entry.line + 1, 0)

    def next(self) -> Key:
        """The key of the next sample."""
        self._fill()
        if not self.buffer:
            if not self.epoch_samples:
                raise DataError(f"{self.name}: holds no usable records")
            self._start_epoch(self.epoch_index + 1)
            self._fill()
        slot = int(self.picker.integers(len(self.buffer))) if len(self.buffer) > 1 else 0
        key, sample = self.buffer[slot]
        self.buffer[slot] = self.buffer[-1]
        self.buffer.pop()
        self.recent[key] = sample
        if len(self.recent) > RECENT:
            del self.recent[next(iter(self.recent))]
        return key

    def fetch(self, key: Key) -> Sample:
        """The ids and labels of the sample ``key`` names."""
        if key in self.recent:
            return self.recent[key]
        return self._read([key])[0]

    def _read(self, keys: list[Key]) -> list[Sample]:
        """Samples read again from their records (each record read and tokenized once)."""
        records = sorted({(shard, offset) for shard, offset, _ in keys})
        values = []
        for shard, offset in records:
            value, problem = self.shards[shard].value_at(offset)
            if problem:
                raise DataError(
                    f"{self.shards[shard].path} at offset {offset}: {problem}; the file "
                    "changed since the checkpoint was saved"
                )
            values.append(value)
        samples = dict(zip(records, self._encode(values), strict=True))
        return [samples[shard, offset][piece] for shard, offset, piece in keys]

    @property
    def name(self) -> str:
        first = self.shards[0].path
        return str(first) if len(self.shards) == 1 else f"{first} and {len(self.shards) - 1} more"

    @property
    def epoch(self) -> float:
        """Epochs read, as a fraction (by bytes of the shards; for progress reports)."""
        sizes = [self.shards[s].size for s in self.order]
        done = sum(sizes[: self.cursor])
        if self.cursor < len(sizes):
            shard = self.shards[self.order[self.cursor]]
            done += shard.size * shard.fraction(self.position[0])
        return self.epoch_index + done / max(sum(sizes), 1)

    def _fingerprint(self) -> list[list]:
        return [[s.path.name, s.size] for s in self.shards]

    def state_dict(self) -> dict[str, Any]:
        return {
            "shards": self._fingerprint(),
            "epoch": self.epoch_index,
            "cursor": self.cursor,
            "position": list(self.position),
            "epoch_samples": self.epoch_samples,
            "skipped": self.skipped,
            "picker": self.picker.bit_generator.state,
            "buffer": [list(key) for key, _ in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shards"] != self._fingerprint():
            raise DataError(
                f"the streaming source's shards changed since the checkpoint (name, bytes): "
                f"{state['shards']} then, {self._fingerprint()} now"
            )
        self._start_epoch(state["epoch"])
        self.cursor, self.position = state["cursor"], tuple(state["position"])
        self.epoch_samples, self.skipped = state["epoch_samples"], state["skipped"]
        self.picker.bit_generator.state = state["picker"]
        keys = [tuple(key) for key in state["buffer"]]
        self.buffer = list(zip(keys, self._read(keys), strict=True))
        self.recent = {}
