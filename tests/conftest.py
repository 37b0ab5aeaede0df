"""Options of the root test suites: ``--run-extra-slow`` runs the tests marked ``extra_slow``
(real Hub checkpoints: multi-GB downloads, tens of GB of memory), skipped by default.

Here and not in ``tests/integration/conftest.py``: pytest registers an option only from
the conftest files it loads before parsing the command line, and ``pytest tests`` (the
nox session's paths) loads ``tests/conftest.py`` but not those of the folders below it.
"""

from __future__ import annotations

import pytest

EXTRA_SLOW = "--run-extra-slow"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        EXTRA_SLOW,
        action="store_true",
        default=False,
        help="run the tests marked extra_slow (real Hub checkpoints: large downloads, memory)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption(EXTRA_SLOW):
        return
    skip = pytest.mark.skip(reason=f"extra_slow (a real Hub checkpoint): {EXTRA_SLOW} not given")
    for item in items:
        if "extra_slow" in item.keywords:
            item.add_marker(skip)
