"""The multi-process harness of loom.dist's tests, for the SP suites here: imported by
path (children inherit ``sys.path``), not copied."""

import sys
from pathlib import Path

_HARNESS = str(Path(__file__).resolve().parents[2] / "packages/core-dist/tests")
if _HARNESS not in sys.path:
    sys.path.insert(0, _HARNESS)
