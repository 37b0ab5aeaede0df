"""When to save and what to resume: the trainer's use of loom.dist.checkpoint.

Checkpoints live in ``<output_dir>/checkpoints/step_<N>/`` (DCP: loadable at any world
size). ``resume: auto`` continues from the newest complete one; a path resumes from
that one; ``none`` starts afresh. SIGTERM (a scheduler's preemption, or Ctrl-C's
SIGINT) lets the step in flight finish, saves, and stops.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import torch.distributed as dist

from loom.dist.checkpoint import latest_checkpoint
from loom.trainer.errors import ConfigError

_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def resume_from(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run continues from, or None to start afresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoints_root(output_dir))
    path = Path(resume)
    if not (path / ".metadata").is_file():
        raise ConfigError(f"checkpoint.resume {path} is not a complete Loom checkpoint")
    return path


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints (rank 0 only)."""
    if keep_last <= 0 or dist.get_rank() != 0:
        return
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))
    )
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps; every rank
    agrees on it (one all-reduce), so all of them save the same step together."""

    def __init__(self) -> None:
        self._signalled = False
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def requested(self, device) -> bool:
        import torch

        flag = torch.tensor([float(self._signalled)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
