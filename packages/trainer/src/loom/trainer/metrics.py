"""What a run reports: metrics.jsonl (always), TensorBoard and wandb (when asked), the
progress bar, and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from loom.trainer.errors import ConfigError


class MetricsLog:
    """One JSON object per optimizer step, flushed at once so a crash loses nothing; also
    sent to TensorBoard / wandb when those are asked for."""

    def __init__(
        self, out: Path, *, tensorboard: bool, wandb_project: str | None, config: dict
    ) -> None:
        self._file = (out / "metrics.jsonl").open("a")
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "log.tensorboard is on but the tensorboard package is not installed "
                    "(pip install 'loom-trainer[tensorboard]')"
                ) from None
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "log.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from None
            self._wandb = wandb.init(project=wandb_project, dir=str(out), config=config)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb:
            self._wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a line cut short by a crash is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _plot(records: list[dict], key: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir: Path) -> list[Path]:
    """Write loss.png and throughput.png from a run directory's metrics.jsonl."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; is it a Loom run directory?")
    records = read_metrics(metrics)
    if not records:
        raise ConfigError(f"{metrics} holds no records yet")
    written = [run_dir / "loss.png", run_dir / "throughput.png"]
    _plot(records, "loss", "loss", written[0])
    _plot(records, "tokens_per_s", "tokens / s", written[1])
    return written
