import json

import datasets
import pytest

from loom.trainer.data.sources import first_bad_line, load_source
from loom.trainer.errors import DataError

CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"text": "ok"}', '{"text": "ok"', '{"text": "x"}'], ":2: not valid JSON"),
        (['{"text": "ok"}', '{"txt": "ok"}'], ':2: field "text" is missing'),
        (['{"text": "ok"}', '{"text": ""}'], ':2: field "text" must be non-empty text'),
        (['{"text": 3}'], ":1: field"),
        (['["text"]'], ":1: expected a JSON object, got list"),
        ([""], "holds no"),
    ],
)
def test_strict_text_names_the_bad_line(tmp_path, lines, needle):
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_source(path, "text", "text", strict=True)
    assert needle in str(info.value)
    assert needle in (first_bad_line(path, "text") or "")


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"messages": []}, "non-empty list of messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 'needs a "role"'),
        (
            {"messages": [{"role": "user", "content": 1}]},
            'needs "content" as a string or a list of parts, found 1',
        ),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ],
)
def test_strict_chat_names_the_bad_line(tmp_path, record, needle):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(CHAT_OK), json.dumps(record)])
    with pytest.raises(DataError, match=":2: ") as info:
        load_source(path, "chat", "messages", strict=True)
    assert needle in str(info.value)


def test_lenient_mode_drops_and_counts(tmp_path):
    lines = ['{"text": "a"}', "{broken", '{"text": ""}', '{"text": "b"}', "[1]"]
    table, dropped = load_source(write_lines(tmp_path / "d.jsonl", lines), "text", "text", False)
    assert dropped == 3
    assert table["text"] == ["a", "b"]


def test_parquet_and_datasets_folder(tmp_path):
    table = datasets.Dataset.from_dict({"body": ["one", "", "three"], "id": [1, 2, 3]})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "d.parquet", tmp_path / "folder"):
        with pytest.raises(DataError, match="row 1: "):
            load_source(path, "text", "body", strict=True)
        kept, dropped = load_source(path, "text", "body", strict=False)
        assert kept["body"] == ["one", "three"] and dropped == 1
        with pytest.raises(DataError, match='has no column "text"'):
            load_source(path, "text", "text", strict=True)


def test_unknown_kind_and_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(tmp_path / "nope.jsonl", "text", "text", True)
    (tmp_path / "shards").mkdir()
    write_lines(tmp_path / "shards" / "part-0.jsonl", ['{"text": "a"}'])
    with pytest.raises(DataError, match="read with streaming: true"):
        load_source(tmp_path / "shards", "text", "text", True)
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"expected \.jsonl"):
        load_source(tmp_path / "d.csv", "text", "text", True)
