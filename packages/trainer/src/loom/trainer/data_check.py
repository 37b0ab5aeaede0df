"""Line-by-line validation of a JSON-lines dataset, cheap enough to run before launch."""

from __future__ import annotations

import json
from pathlib import Path


def first_bad_line(path: Path, field: str) -> str | None:
    """Name the first line that is not a JSON object with a non-empty string ``field``."""
    records = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: not valid JSON ({err.msg})"
            if not isinstance(record, dict):
                return f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                found = "missing" if field not in record else f"{value!r}"
                return f'{path}:{number}: field "{field}" must be non-empty text, found {found}'
            records += 1
    return None if records else f"{path}: holds no records"
