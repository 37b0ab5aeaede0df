"""Make ``_dist_harness`` importable by the test modules and by the processes they start
(spawn and forkserver children inherit ``sys.path``), and start the harness's
forkserver now, so its imports overlap with collection instead of the first test."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from _dist_harness import start_workers  # noqa: E402

start_workers()
