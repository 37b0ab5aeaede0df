"""Puts the fixture packages (a toy upstream, patch configs, helpers) on sys.path."""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
_counter = itertools.count()


# At import, before test modules are collected: they import fixture modules at the top.
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))


@pytest.fixture
def config_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Writes a config module into tmp_path (so its generated/ folder lands there too)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(text: str) -> str:
        name = f"patchgen_test_config_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(text)
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
