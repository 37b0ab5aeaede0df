import json

import numpy as np
import pytest
import torch

from loom.trainer.data import (
    IGNORE_INDEX,
    global_batches,
    load_texts,
    pack,
    rank_micro_batches,
)
from loom.trainer.data_check import first_bad_line
from loom.trainer.errors import DataError


def reference_pack(docs, eos, seq_len):
    """Token by token, the way the packing is described in words."""
    tokens, is_start = [], []
    for doc in docs:
        for j, t in enumerate([*doc, eos]):
            tokens.append(t)
            is_start.append(j == 0)
    rows = (len(tokens) - 1) // seq_len
    inputs, labels, positions = [], [], []
    for r in range(rows):
        row_in, row_lab, row_pos, pos = [], [], [], 0
        for j in range(seq_len):
            i = r * seq_len + j
            pos = 0 if (j == 0 or is_start[i]) else pos + 1
            row_in.append(tokens[i])
            row_lab.append(IGNORE_INDEX if is_start[i + 1] else tokens[i + 1])
            row_pos.append(pos)
        inputs.append(row_in)
        labels.append(row_lab)
        positions.append(row_pos)
    return np.array(inputs), np.array(labels), np.array(positions)


@pytest.mark.parametrize("seq_len", [4, 7, 16])
def test_pack_matches_reference(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [list(rng.integers(2, 50, rng.integers(1, 12))) for _ in range(20)]
    got = pack(docs, eos_id=1, seq_len=seq_len)
    ref = reference_pack(docs, 1, seq_len)
    np.testing.assert_array_equal(got.input_ids, ref[0])
    np.testing.assert_array_equal(got.labels, ref[1])
    np.testing.assert_array_equal(got.position_ids, ref[2])


def test_pack_too_little_data():
    with pytest.raises(DataError, match="fewer than one row"):
        pack([[5, 6]], eos_id=1, seq_len=8)


def test_global_batches_cover_epoch_without_repeats():
    it = global_batches(n_rows=10, global_batch_size=3, seed=0)
    epoch = np.concatenate([next(it) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9
    again = global_batches(n_rows=10, global_batch_size=3, seed=0, start_step=2)
    np.testing.assert_array_equal(next(again), epoch[6:9])


def test_rank_shares_reassemble_the_global_batch():
    rows = pack([list(range(2, 40))] * 4, eos_id=1, seq_len=8)
    batch = np.arange(len(rows))[:8]
    pieces = []
    for rank in range(2):
        for mb in rank_micro_batches(rows, batch, rank, 2, micro_batch_size=2):
            assert mb["input_ids"].shape == (2, 8)
            pieces.append(mb["input_ids"])
    torch.testing.assert_close(torch.cat(pieces), torch.from_numpy(rows.input_ids[batch]))


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"text": "ok"}', '{"text": "ok"', '{"text": "x"}'], ":2: not valid JSON"),
        (
            ['{"text": "ok"}', '{"txt": "ok"}'],
            ':2: field "text" must be non-empty text, found missing',
        ),
        (['{"text": "ok"}', '{"text": ""}'], ':2: field "text" must be non-empty text'),
        (['{"text": 3}'], ":1: field"),
        (['["text"]'], ":1: expected a JSON object, got list"),
        ([""], "holds no records"),
    ],
)
def test_bad_lines_are_named(tmp_path, lines, needle):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert needle in first_bad_line(path, "text")
    with pytest.raises(DataError) as info:
        load_texts(path, "text")
    assert needle in str(info.value)


def test_load_texts_reads_every_record(tmp_path):
    path = tmp_path / "d.jsonl"
    texts = [f"doc {i}" for i in range(5)]
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert load_texts(path, "body") == texts
    assert first_bad_line(path, "body") is None
