"""Saving, resuming and stopping: the trainer's use of loom.dist.checkpoint.

Checkpoints live in ``<output_dir>/checkpoints/step_<N>/`` (DCP: loadable at any world
size). ``resume: auto`` continues from the newest complete one; a path resumes from
that one; ``none`` starts afresh. SIGTERM (a scheduler's preemption, or Ctrl-C's
SIGINT) lets the step in flight finish, saves, and stops. A checkpoint holds the model,
optimizer and scheduler, plus the data loader's position and the tokens seen.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from loom.dist.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loom.trainer.errors import ConfigError
from loom.trainer.metrics import read_metrics

if TYPE_CHECKING:
    from loom.trainer.run import Run

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
    """Turns SIGTERM / SIGINT into a flag each step reduces over the ranks, so all of them
    save the same step together."""

    def __init__(self) -> None:
        self._signalled = False
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def flag(self, device) -> torch.Tensor:
        """1 where this rank was asked to stop, else 0: the step sums it over the ranks
        together with the loss, so stopping costs no collective of its own. Filled on the
        device (a copy from the host would wait for the GPU)."""
        return torch.full((), float(self._signalled), device=device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save(run: Run) -> Path:
    """Save the run's step (every rank), then drop checkpoints beyond ``keep_last``."""
    root = checkpoints_root(run.out)
    path = save_checkpoint(
        root, run.step, run.model, run.optimizer, run.scheduler, data_state(run),
        run.parallel.device, trainable_only=run.config.lora.enabled,
    )  # fmt: skip
    prune(root, run.config.checkpoint.keep_last)
    return path


def resume(run: Run) -> None:
    """Continue from ``checkpoint.resume``'s checkpoint, if there is one."""
    path = resume_from(run.out, run.config.checkpoint.resume)
    if path is None:
        if run.config.checkpoint.resume == "auto":
            run.console.print(f"no checkpoint in {checkpoints_root(run.out)}: starting at step 0")
        return
    resumed = load_checkpoint(
        path, run.model, run.optimizer, run.scheduler, run.parallel.device,
        trainable_only=run.config.lora.enabled,
    )  # fmt: skip
    if resumed.weights_only:  # e.g. from loom convert hf-to-dcp: only the weights continue
        run.console.print(f"starting at step 0 from the weights in {path}")
        return
    run.loader.load_state_dict(resumed.data_state["loader"])
    run.step, run.tokens = resumed.step, resumed.data_state["tokens"]
    run.console.print(f"resumed from {path} (saved at world size {resumed.saved_world_size})")
    if run.parallel.rank == 0:
        keep_metrics_until(run.out / "metrics.jsonl", run.step)


def data_state(run: Run) -> dict:
    """What a checkpoint keeps besides model, optimizer and scheduler."""
    return {"loader": run.loader.state_dict(), "tokens": run.tokens}


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records a killed run wrote after the checkpoint it resumes from."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
