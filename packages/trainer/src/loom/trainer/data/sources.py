"""Read a data source (JSON lines, Parquet, or a ``datasets`` folder) and check its records.

Text records need a non-empty string field; chat records a list of
``{"role": ..., "content": ...}`` messages with at least one assistant turn (content: a
string, or a list of text and image parts for a vision-language model). In strict
mode the first bad record stops the run with its file and line (or row); otherwise bad
records are dropped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

from loom.trainer.errors import DataError

Format = Literal["text", "chat"]
ROLES = {"system", "user", "assistant", "tool"}


def record_problem(record: Any, fmt: Format, field: str) -> str | None:
    """Why ``record`` cannot be trained on, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if field not in record:
        return f'field "{field}" is missing'
    value = record[field]
    if fmt == "text":
        if not isinstance(value, str) or not value.strip():
            return f'field "{field}" must be non-empty text, found {value!r}'
        return None
    if not isinstance(value, list) or not value:
        return f'field "{field}" must be a non-empty list of messages, found {value!r}'
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f'{field}[{i}] needs a "role" of {sorted(ROLES)}, found {message!r}'
        problem = _content_problem(message.get("content"))
        if problem:
            return f"{field}[{i}]: {problem}"
    if not any(m["role"] == "assistant" for m in value):
        return f'field "{field}" has no assistant message to train on'
    return None


def _content_problem(content: Any) -> str | None:
    """A message's content: a string, or a list of text and image parts."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f'needs "content" as a string or a list of parts, found {content!r}'
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind in ("image", "video"):
            continue
        return f'a content part must be {{"type": "text", "text": ...}} or an image, found {part!r}'
    return None


@dataclass
class JsonlScan:
    records: int
    bad: list[tuple[int, str]]  # (line number, problem)


def parse_jsonl_line(line: str, fmt: Format, field: str) -> tuple[Any, str | None]:
    """``(value of field, None)`` for a good line, ``(None, problem)`` for a bad one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg})"
    problem = record_problem(record, fmt, field)
    return (None, problem) if problem else (record[field], None)


def scan_jsonl(path: Path, fmt: Format, field: str, stop_at_first: bool) -> JsonlScan:
    records, bad = 0, []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            _, problem = parse_jsonl_line(line, fmt, field)
            if problem is None:
                records += 1
                continue
            bad.append((number, problem))
            if stop_at_first:
                break
    return JsonlScan(records, bad)


def first_bad_line(path: Path, field: str, fmt: Format = "text") -> str | None:
    """``path:line: problem`` for the first bad line of a JSON-lines file, or None."""
    scan = scan_jsonl(path, fmt, field, stop_at_first=True)
    if scan.bad:
        number, problem = scan.bad[0]
        return f"{path}:{number}: {problem}"
    return None if scan.records else f"{path}: holds no records"


def _good_jsonl_records(path: Path, fmt: Format, field: str) -> Iterator[dict]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            value, problem = parse_jsonl_line(line, fmt, field)
            if problem is None:
                yield {field: value}


def _load_jsonl(path: Path, fmt: Format, field: str, strict: bool) -> tuple[datasets.Dataset, int]:
    scan = scan_jsonl(path, fmt, field, stop_at_first=strict)
    if strict and scan.bad:
        number, problem = scan.bad[0]
        raise DataError(f"{path}:{number}: {problem}")
    if not scan.records:
        raise DataError(f"{path}: holds no usable records")
    if not scan.bad:  # Arrow's JSON reader is fast; it only sees files known to be clean
        table = datasets.load_dataset("json", data_files=str(path), split="train")
        return table.select_columns([field]), 0
    table = datasets.Dataset.from_generator(
        _good_jsonl_records, gen_kwargs={"path": path, "fmt": fmt, "field": field}
    )
    return table, len(scan.bad)


def _check_table(
    table: datasets.Dataset, path: Path, fmt: Format, field: str, strict: bool
) -> tuple[datasets.Dataset, int]:
    if field not in table.column_names:
        raise DataError(f'{path}: has no column "{field}" (columns: {table.column_names})')
    table = table.select_columns([field])
    good = [record_problem(r, fmt, field) is None for r in table]
    if strict and not all(good):
        row = good.index(False)
        raise DataError(f"{path}: row {row}: {record_problem(table[row], fmt, field)}")
    if not any(good):
        raise DataError(f"{path}: holds no usable records")
    if all(good):
        return table, 0
    return table.select([i for i, ok in enumerate(good) if ok]), good.count(False)


def load_source(path: Path, fmt: Format, field: str, strict: bool) -> tuple[datasets.Dataset, int]:
    """The source's records (one column, ``field``) and how many bad ones were dropped."""
    if not path.exists():
        raise DataError(f"data source {path} does not exist")
    if path.is_dir():
        try:
            table = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(
                f"{path}: not a folder written by datasets.save_to_disk ({err}); a folder "
                "of .jsonl / .parquet shards is read with streaming: true"
            ) from None
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise DataError(f"{path}: a DatasetDict without a 'train' split: {list(table)}")
            table = table["train"]
        return _check_table(table, path, fmt, field, strict)
    if path.suffix == ".parquet":
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return _check_table(table, path, fmt, field, strict)
    if path.suffix in (".jsonl", ".json"):
        return _load_jsonl(path, fmt, field, strict)
    raise DataError(f"data source {path}: expected .jsonl, .json, .parquet or a datasets folder")
