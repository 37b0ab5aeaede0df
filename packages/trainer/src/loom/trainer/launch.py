"""torchrun, quiet about ranks that stopped on bad input and said so themselves.

The ``loom`` launcher runs ``python -m loom.trainer.launch ARGS`` where it would run
``python -m torch.distributed.run ARGS``. A rank that stops on a user's error writes its
one-line message into ``$LOOM_ERROR_DIR`` and exits 2 without a traceback; the launcher
prints that line. torchrun would add its own account of the failure (log lines naming
the exit codes and the ranks it stopped, a ``ChildFailedError`` traceback): here it is
dropped once a rank has reported, and kept for any other failure, a crash, whose details
are the point.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from loom.trainer.cli import ERROR_DIR_ENV


class _DropOnceReported(logging.Filter):
    def __init__(self, error_dir: Path) -> None:
        super().__init__()
        self.error_dir = error_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return not _reported(self.error_dir)


def _reported(error_dir: Path) -> bool:
    return any(error_dir.iterdir())


def main() -> int:
    error_dir = Path(os.environ[ERROR_DIR_ENV])
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet = _DropOnceReported(error_dir)
    # On the loggers themselves: torch may replace its handlers (and their filters) later.
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.addFilter(quiet)
    try:
        torchrun.main(sys.argv[1:])
    except ChildFailedError:
        if not _reported(error_dir):
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
