"""The ``loom`` command.

    loom train CONFIG [--section.key value ...] [--nproc N]

``--nproc N`` starts N processes on this machine with torchrun, each running the same
command without ``--nproc``. Bad input is reported once, before any process starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.text import Text

from loom.trainer.config import Config, check_inputs, load_config
from loom.trainer.errors import ConfigError, Interrupted, LoomError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Train HF models at scale.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        epilog="Any config key can be overridden: --train.lr 1e-4 --data.max_seq_len 4096",
    )
    train.add_argument("config", type=Path, help="YAML run config")
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    plot = commands.add_parser("plot", help="write loss.png and throughput.png of a run")
    plot.add_argument("run_dir", type=Path, help="a run's output directory")
    return parser


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def prepare_output_dir(config: Config) -> None:
    """Refuse to write into a directory that holds an earlier run, unless told to
    resume it (a complete checkpoint and ``checkpoint.resume`` not ``none``) or to
    replace it (``train.overwrite``)."""
    out = config.train.output_dir
    if not out.exists() or not any(out.iterdir()):
        return
    if config.train.overwrite:
        shutil.rmtree(out)
        return
    from loom.trainer.checkpointing import resume_from

    if config.checkpoint.resume != "none" and resume_from(out, config.checkpoint.resume):
        return
    raise ConfigError(
        f"train.output_dir {out} already holds files from an earlier run and no checkpoint "
        "to resume; choose another directory or pass --train.overwrite true to replace it"
    )


def _launch(nproc: int, config_path: Path, overrides: list[str]) -> int:
    """Run torchrun as a child; a SIGTERM / SIGINT sent to this process is passed on, so a
    scheduler's preemption reaches the ranks (which save and stop) instead of orphaning them."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "loom.trainer.cli", "train", str(config_path),
        *overrides,
    ]  # fmt: skip
    child = subprocess.Popen(command)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        # torchrun turns its ranks' orderly stop into a failure code; a stop that was
        # asked for reads as the signal, the way a shell reports it.
        return 128 + received[0] if received and code else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _data_parallel_size(config: Config, world: int) -> int:
    from loom.dist.mesh import resolve_degrees

    p = config.parallel
    try:
        replicate, shard, _, _ = resolve_degrees(
            world, p.dp_replicate, p.dp_shard, p.sp_size, p.ep_size
        )
    except ValueError as err:
        raise ConfigError(f"parallel section with --nproc {world}: {err}") from None
    return replicate * shard


def _check_devices(nproc: int) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc} asks for one process per GPU, but this machine has {gpus}; "
            f"use --nproc {gpus} or fewer"
        )


def train_command(config_path: Path, nproc: int, overrides: list[str]) -> int:
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    config = load_config(config_path, overrides)
    if _under_launcher():
        from loom.trainer.train import train  # torch import only where it is needed

        train(config)
        return 0
    check_inputs(config)
    config.check_world(_data_parallel_size(config, nproc))
    _check_devices(nproc)
    prepare_output_dir(config)
    if nproc > 1:
        # The launched ranks must not clear the directory again.
        return _launch(nproc, config_path, [*overrides, "--train.overwrite", "false"])
    from loom.trainer.train import train

    train(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.command == "plot":
            if overrides:
                parser.error(f"unrecognized arguments: {' '.join(overrides)}")
            from loom.trainer.metrics import plot_run

            for path in plot_run(args.run_dir):
                print(path)
            return 0
        if args.print_config:
            config = load_config(args.config, overrides)
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        return train_command(args.config, args.nproc, overrides)
    except Interrupted as err:
        if os.environ.get("RANK", "0") == "0":
            Console(stderr=True).print(f"stopped: {err}", soft_wrap=True, highlight=False)
        return 143  # what a shell reports for SIGTERM
    except LoomError as err:
        if os.environ.get("RANK", "0") == "0":  # one report, not one per process
            message = Text.assemble(("error: ", "bold red"), str(err))
            Console(stderr=True).print(message, soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
