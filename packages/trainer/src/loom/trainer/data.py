"""Text data: read JSON lines with `datasets`, tokenize, pack into fixed-length rows.

A packed row holds several documents back to back. Position ids restart at every
document, which is how the attention keeps documents apart (HF turns restarting
position ids into a block-diagonal mask; Loom's varlen backends read the same ids).
Labels are the inputs shifted by one over the whole token stream, so no token is
lost at row boundaries; the label that would cross from one document into the next
is ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from loom.trainer.data_check import first_bad_line
from loom.trainer.errors import DataError

IGNORE_INDEX = -100


def load_texts(path: Path, field: str) -> list[str]:
    """All ``field`` values of a JSON-lines file; ``DataError`` naming the first bad line."""
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    # Arrow's reader accepts some records Loom must refuse (a bare list, a number for
    # text) and names no line when it fails, so each line is checked first.
    problem = first_bad_line(path, field)
    if problem:
        raise DataError(problem)
    table = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    return table[field]


@dataclass
class PackedRows:
    """``input_ids``, ``labels``, ``position_ids``: int64 arrays of shape [rows, seq_len]."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> PackedRows:
    """Concatenate ``doc + [eos]`` and cut the stream into rows of ``seq_len`` tokens."""
    lengths = np.array([len(d) + 1 for d in docs])
    stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs])
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    rows = (len(stream) - 1) // seq_len
    if rows == 0:
        raise DataError(
            f"the dataset holds {len(stream)} tokens, fewer than one row of "
            f"data.max_seq_len={seq_len} + 1; add data or lower max_seq_len"
        )
    used = rows * seq_len
    inputs = stream[:used].reshape(rows, seq_len)
    labels = stream[1 : used + 1].copy()
    labels[starts[1 : used + 1]] = IGNORE_INDEX  # never predict a document from the last one
    row_starts = starts[:used].reshape(rows, seq_len).copy()
    row_starts[:, 0] = True
    # position = distance from the latest document start within the row
    index = np.broadcast_to(np.arange(seq_len), (rows, seq_len))
    last_start = np.maximum.accumulate(np.where(row_starts, index, 0), axis=1)
    return PackedRows(inputs, labels.reshape(rows, seq_len), index - last_start)


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    dataset = datasets.Dataset.from_dict({"text": texts})
    encoded = dataset.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
        keep_in_memory=True,
    )
    return encoded["ids"]


def global_batches(
    n_rows: int, global_batch_size: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Row indices of each optimizer step, the same for every world size.

    Each epoch is a fresh permutation seeded by ``seed`` and the epoch number; a batch
    never spans two epochs (the remainder of an epoch is dropped).
    """
    if n_rows < global_batch_size:
        raise DataError(
            f"the dataset packs into {n_rows} rows, fewer than "
            f"train.global_batch_size={global_batch_size}; add data or shrink the batch"
        )
    per_epoch = n_rows // global_batch_size
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n_rows)
        yield order[index * global_batch_size : (index + 1) * global_batch_size]
        step += 1


def rank_micro_batches(
    rows: PackedRows, batch: np.ndarray, dp_rank: int, dp_size: int, micro_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's contiguous share of a global batch, split into micro-batches."""
    share = np.array_split(batch, dp_size)[dp_rank]
    out = []
    for i in range(0, len(share), micro_batch_size):
        idx = share[i : i + micro_batch_size]
        out.append(
            {
                "input_ids": torch.from_numpy(rows.input_ids[idx]),
                "labels": torch.from_numpy(rows.labels[idx]),
                "position_ids": torch.from_numpy(rows.position_ids[idx]),
            }
        )
    return out
