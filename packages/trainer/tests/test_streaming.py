import json
from collections import Counter

import datasets
import numpy as np
import pytest

from loom.trainer.data.loader import BatchLoader
from loom.trainer.data.samples import tokenize_source
from loom.trainer.data.sources import load_source
from loom.trainer.data.streaming import StreamSource, stream_shards
from loom.trainer.errors import DataError

WORDS = ["Ada", "had", "a", "small", "cat", "that", "lived", "near", "the", "old", "mill"]


def texts(n, start=0):
    # from one word to several rows of 16 tokens, so long records are split
    return [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + (i * 7) % 40))
        for i in range(start, start + n)
    ]


def chats(n):
    return [
        [
            {"role": "user", "content": f"Who had item {i}?"},
            {"role": "assistant", "content": " ".join(WORDS[: 1 + i % len(WORDS)])},
        ]
        for i in range(n)
    ]


def write_jsonl(path, values, field="text", bad=None):
    lines = [json.dumps({field: v}) for v in values]
    for line_no, line in sorted((bad or {}).items()):
        lines.insert(line_no - 1, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path, values, field="text"):
    datasets.Dataset.from_dict({field: values}).to_parquet(str(path), batch_size=7)
    return path  # several row groups of 7 rows


def stream(path, tok, fmt="text", field="text", buffer=0, strict=True, seed=(0, 0), **kw):
    shards = stream_shards(path)
    return StreamSource(
        shards,
        tok,
        fmt=fmt,
        field=field,
        max_len=16,
        strict=strict,
        shuffle_buffer=buffer,
        seed=seed,
        **kw,
    )


def fetched(source, key):
    ids, labels = source.fetch(key)
    return ids.tolist(), labels.tolist()


def drawn(source, n):
    return [fetched(source, source.next()) for _ in range(n)]


def epoch_of(source):
    """The samples of the source's current epoch, and the first one of the next."""
    start, out = source.epoch_index, []
    while True:
        sample = fetched(source, source.next())
        if source.epoch_index != start:
            return out, sample
        out.append(sample)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_same_samples_as_in_memory_without_shuffle(tmp_path, kind, fmt, chat_tokenizer):
    field = "text" if fmt == "text" else "messages"
    values = texts(40) if fmt == "text" else chats(30)
    writer = write_jsonl if kind == "jsonl" else write_parquet
    path = writer(tmp_path / f"d.{kind}", values, field)
    table = tokenize_source(
        load_source(path, fmt, field, strict=True)[0], chat_tokenizer, fmt, field, 16
    )
    assert len(table) > len(values)  # some records became several samples
    expected = list(zip(table["input_ids"], table["labels"], strict=True))
    source = stream(path, chat_tokenizer, fmt, field)
    assert drawn(source, len(expected)) == expected
    assert drawn(source, 3) == expected[:3] and source.epoch_index == 1  # the next epoch


def test_shuffle_covers_each_epoch_once_and_reshuffles(tmp_path, tokenizer):
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", texts(15, 15 * i))
    ordered, _ = epoch_of(stream(tmp_path, tokenizer))
    source = stream(tmp_path, tokenizer, buffer=9)
    first, head = epoch_of(source)
    rest, _ = epoch_of(source)
    second = [head, *rest]
    assert Counter(map(str, first)) == Counter(map(str, ordered)) == Counter(map(str, second))
    assert first != ordered and second != first
    assert drawn(stream(tmp_path, tokenizer, buffer=9), len(first)) == first  # seeded
    assert drawn(stream(tmp_path, tokenizer, buffer=9, seed=(1, 0)), len(first)) != first


def test_shards_from_a_folder_and_a_glob(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    write_jsonl(shards / "a.jsonl", texts(5))
    write_parquet(shards / "sub" / "b.parquet", texts(5, 5))
    (shards / "notes.txt").write_text("not a shard")
    assert stream_shards(shards) == [shards / "a.jsonl", shards / "sub" / "b.parquet"]
    assert stream_shards(shards / "**" / "*.parquet") == [shards / "sub" / "b.parquet"]
    whole = write_jsonl(tmp_path / "whole.jsonl", texts(10))
    n = len(epoch_of(stream(whole, tokenizer))[0])
    assert drawn(stream(shards, tokenizer), n) == drawn(stream(whole, tokenizer), n)
    with pytest.raises(DataError, match="matches no"):
        stream_shards(shards / "*.arrow")
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"save_to_disk folder.*streaming: false"):
        stream_shards(tmp_path / "saved")


def test_strict_names_file_and_line(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", texts(4))
    write_jsonl(tmp_path / "b.jsonl", texts(4), bad={3: '{"text": "ok"'})
    source = stream(tmp_path, tokenizer)
    with pytest.raises(DataError, match=r"b\.jsonl:3: not valid JSON"):
        drawn(source, 100)
    write_parquet(tmp_path / "c.parquet", ["one", "", "three"])
    with pytest.raises(DataError, match=r"c\.parquet: row 1: field"):
        drawn(stream(tmp_path / "c.parquet", tokenizer), 5)
    with pytest.raises(DataError, match='has no column "body"'):
        drawn(stream(tmp_path / "c.parquet", tokenizer, field="body"), 1)


def test_lenient_counts_bad_records_once_per_epoch(tmp_path, tokenizer):
    bad = {2: "{broken", 5: '{"text": ""}', 6: "[1]"}
    path = write_jsonl(tmp_path / "d.jsonl", ["one", "two", "three", "four"], bad=bad)
    warnings = []
    source = stream(path, tokenizer, strict=False, warn=warnings.append)
    tokens = [ids for ids, _ in drawn(source, 4)]
    eos = [tokenizer.eos_token_id]
    words = ("one", "two", "three", "four")
    assert tokens == [tokenizer(w, add_special_tokens=False)["input_ids"] + eos for w in words]
    assert source.skipped == 3 and len(warnings) == 1 and "d.jsonl:2: not valid JSON" in warnings[0]
    drawn(source, 4)
    assert source.skipped == 6  # the second epoch reads them again
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["", ""])
    with pytest.raises(DataError, match="holds no usable records"):
        drawn(stream(only_bad, tokenizer, strict=False), 1)


def loader(sources, weights, unit="rows"):
    return BatchLoader(
        sources,
        weights=weights,
        splittable=[True] * len(sources),
        seed=3,
        row_len=16,
        pad_id=0,
        batch_size=4,
        unit=unit,
    )


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.position_ids, b.position_ids)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("cut", [1, 6, 15])
def test_loader_resumes_mid_stream_and_across_epochs(tmp_path, tokenizer, mixed, cut):
    write_jsonl(tmp_path / "a.jsonl", texts(5), bad={4: "{broken"})
    write_parquet(tmp_path / "b.parquet", texts(9, 9))

    def make():
        sources = [stream(tmp_path, tokenizer, buffer=5, strict=False)]
        if mixed:  # and an in-memory source, as often
            table = datasets.Dataset.from_dict({"text": texts(20, 50)})
            sources.append(tokenize_source(table, tokenizer, "text", "text", 16))
        return loader(sources, [1.0] * len(sources))

    straight = make()
    expected = [straight.next_batch(rows_multiple=2) for _ in range(20)]
    assert straight.streams[0].epoch_index >= 1 + (not mixed)  # the cuts span epochs
    first = make()
    for _ in range(cut):
        first.next_batch(rows_multiple=2)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint
    for want in expected[cut:]:
        assert_same_batches(resumed.next_batch(rows_multiple=2), want)
    assert resumed.skipped_records == straight.skipped_records > 0
    assert resumed.epoch == straight.epoch


def test_mixture_shares_follow_the_weights(tmp_path, tokenizer):
    write_jsonl(tmp_path / "s.jsonl", ["streamed words"] * 50)
    table = tokenize_source(
        datasets.Dataset.from_dict({"text": ["kept in memory"] * 50}), tokenizer, "text", "text", 16
    )
    mixed = loader([stream(tmp_path / "s.jsonl", tokenizer, buffer=8), table], [1.0, 3.0])
    streamed = [mixed._draw()[0] for _ in range(400)].count(0) / 400
    assert abs(streamed - 0.25) < 0.06  # binomial sd is about 0.02


def test_changed_shards_refuse_the_checkpoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", texts(10))
    source = stream(path, tokenizer, buffer=4)
    drawn(source, 3)
    state = source.state_dict()
    write_jsonl(path, texts(11))
    with pytest.raises(DataError, match="shards changed since the checkpoint"):
        stream(path, tokenizer, buffer=4).load_state_dict(state)
