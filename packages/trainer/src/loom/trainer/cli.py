"""The ``loom`` command.

    loom train CONFIG [--section.key value ...] [--nproc N]
    loom plan CONFIG [--gpus N] [--device NAME] [--section.key value ...]
    loom convert dcp-to-hf CHECKPOINT DST [--model HF_DIR] [--nproc N]
    loom convert hf-to-dcp SRC DST [--nproc N]
    loom truncate SRC DST --layers N [--vision-layers M]
    loom verify SRC [--tolerance-factor F] [--batch B --seq S]

``--nproc N`` starts N processes on this machine with torchrun, each running the same
command without ``--nproc``. Bad input is reported as one ``error:`` line and exit status
2: before any process starts where the launcher can see it, else by the ranks, which write
their message into ``$LOOM_ERROR_DIR`` for the launcher to print once (torchrun's report of
the failed ranks is dropped: see ``loom.trainer.launch``). ``LOOM_DEBUG=1`` adds the
traceback. ``loom verify`` exits 1 when Loom's numbers differ from upstream's beyond the
tolerance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import yaml
from rich.console import Console
from rich.text import Text

from loom.trainer.config import Config, MovedKeyWarning, check_inputs, load_config
from loom.trainer.errors import ConfigError, Interrupted, LoomError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Train HF models at scale.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        epilog="Any config key can be overridden: --optim.lr 1e-4 --data.max_seq_len 4096",
    )
    train.add_argument("config", type=Path, help="YAML run config")
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    plot = commands.add_parser("plot", help="write loss.png and throughput.png of a run")
    plot.add_argument("run_dir", type=Path, help="a run's output directory")
    plan = commands.add_parser(
        "plan", help="per-GPU memory and speed of a config, before running it",
        epilog="Config keys can be overridden as for train: --memory.activation_checkpointing true",
    )  # fmt: skip
    plan.add_argument("config", type=Path, help="YAML run config")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs the run would use")
    plan.add_argument(
        "--device",
        help="a device profile (h100-sxm, h200, a100-80gb, ...; default: this machine's)",
    )
    convert = commands.add_parser("convert", help="a Loom checkpoint to an HF folder, or back")
    kinds = convert.add_subparsers(dest="kind", required=True)
    to_hf = kinds.add_parser("dcp-to-hf", help="a training checkpoint to HF safetensors")
    to_hf.add_argument("checkpoint", type=Path, help="a run's checkpoints/step_<N> folder")
    to_hf.add_argument("dst", type=Path, help="new folder to write")
    to_hf.add_argument(
        "--model", type=Path, help="the HF folder the run started from (default: the run's)"
    )
    to_hf.add_argument(
        "--max-shard-size", default="5GiB", help="largest output file (default 5GiB, as export)"
    )
    to_dcp = kinds.add_parser("hf-to-dcp", help="HF safetensors to a checkpoint to start from")
    to_dcp.add_argument("src", type=Path, help="HF checkpoint folder (safetensors)")
    to_dcp.add_argument("dst", type=Path, help="new folder to write")
    for kind in (to_hf, to_dcp):
        kind.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    truncate = commands.add_parser(
        "truncate", help="write the first N decoder layers of an HF checkpoint to a new folder"
    )
    truncate.add_argument("src", type=Path, help="HF checkpoint folder (safetensors)")
    truncate.add_argument("dst", type=Path, help="new folder to write")
    truncate.add_argument("--layers", type=int, required=True, help="decoder layers to keep")
    truncate.add_argument(
        "--vision-layers", type=int, help="vision blocks to keep (default: the whole tower)"
    )
    verify = commands.add_parser(
        "verify", help="compare Loom's logits and loss with upstream transformers' (fp32, CPU)"
    )
    verify.add_argument("src", type=Path, help="HF checkpoint folder (safetensors)")
    verify.add_argument(
        "--tolerance-factor", type=float, help="times the base tolerance (default: per model)"
    )
    verify.add_argument("--batch", type=int, default=2, help="rows of random tokens")
    verify.add_argument("--seq", type=int, default=32, help="tokens per row")
    return parser


ERROR_DIR_ENV = "LOOM_ERROR_DIR"


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _print_error(message: str) -> None:
    text = Text.assemble(("error: ", "bold red"), message)
    Console(stderr=True).print(text, soft_wrap=True, highlight=False)


def _load_config(path: Path, overrides: list[str]) -> Config:
    """``load_config``, with a ``warning:`` line for each key given under its old name,
    printed once: ranks the ``loom`` launcher started read the config it already read."""
    launched = os.environ.get(ERROR_DIR_ENV) and _under_launcher()
    quiet = launched or os.environ.get("RANK", "0") != "0"
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, MovedKeyWarning):
            default(message, category, filename, lineno, file, line)
        elif not quiet:
            text = Text.assemble(("warning: ", "bold yellow"), str(message))
            Console(stderr=True).print(text, soft_wrap=True, highlight=False)

    with warnings.catch_warnings():
        warnings.simplefilter("always", MovedKeyWarning)
        warnings.showwarning = show
        return load_config(path, overrides)


def _report(err: LoomError) -> None:
    """Tell the user once: printed here (one process, or ranks torchrun started by hand:
    rank 0), or, under the ``loom`` launcher, written for it to print."""
    if os.environ.get("LOOM_DEBUG") == "1":
        traceback.print_exception(err)
    rank = os.environ.get("RANK", "0")
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and _under_launcher():
        (Path(error_dir) / f"rank{rank}").write_text(str(err))
    elif rank == "0":
        _print_error(str(err))


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced")


# What a run writes before its first checkpoint completes (loom.trainer.run, metrics).
_EARLY = {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"}


def prepare_output_dir(config: Config) -> Path | None:
    """Refuse to write into a directory that holds an earlier run, unless told to
    resume it (a complete checkpoint and ``checkpoint.resume`` not ``none``) or to
    replace it (``train.overwrite``). A run to replace is moved aside, not deleted, until
    the new run has trained (``settle_output_dir``); returns where it went, if it did."""
    out = config.train.output_dir
    if not out.exists() or not any(out.iterdir()):
        return None
    from loom.trainer.checkpointing import resume_from

    overwrite, resume = config.train.overwrite, config.checkpoint.resume
    if not overwrite and resume != "none" and resume_from(out, resume):
        return None
    # A run stopped before its first checkpoint left only what every run writes at once
    # (its config, the steps it logged, a partial save): nothing to resume, so the same
    # command starts it again, keeping the old files aside until a step has trained.
    unsaved = resume == "auto" and {p.name for p in out.iterdir()} <= _EARLY
    if overwrite or unsaved:
        if not overwrite:
            print(f"{out} holds a run that saved no checkpoint: starting it again")
        aside = _aside(out)
        shutil.rmtree(aside, ignore_errors=True)  # left by a launcher that was killed
        out.rename(aside)
        return aside
    raise ConfigError(
        f"train.output_dir {out} already holds files from an earlier run and no checkpoint "
        "to resume; choose another directory or pass --train.overwrite true to replace it"
    )


def settle_output_dir(out: Path, aside: Path | None, failed: bool) -> None:
    """Drop the replaced run once the new one has trained a step; put it back when the new
    run failed before that (bad input must not cost the user their earlier run)."""
    if aside is None or not aside.exists():
        return
    metrics = out / "metrics.jsonl"
    if failed and not (metrics.is_file() and metrics.stat().st_size):
        shutil.rmtree(out, ignore_errors=True)
        aside.rename(out)
    else:
        shutil.rmtree(aside)


def _launch(nproc: int, command: list[str]) -> int:
    """Run torchrun as a child and print the first error its ranks reported; a SIGTERM /
    SIGINT sent to this process is passed on, so a scheduler's preemption reaches the
    ranks (which save and stop) instead of orphaning them."""
    with tempfile.TemporaryDirectory(prefix="loom-errors-") as error_dir:
        env = {**os.environ, ERROR_DIR_ENV: error_dir}
        # torchrun would set it to 1 as well, with a banner saying so.
        env.setdefault("OMP_NUM_THREADS", "1")
        code = _run_torchrun(nproc, command, env)
        reports = sorted(Path(error_dir).iterdir(), key=lambda f: int(f.name.removeprefix("rank")))
        if code and reports:
            rank = reports[0].name.removeprefix("rank")
            _print_error(("" if rank == "0" else f"rank {rank}: ") + reports[0].read_text())
            return 2
    return code


def _run_torchrun(nproc: int, command: list[str], env: dict) -> int:
    """``command``: the ``loom`` arguments each rank runs (without ``--nproc``)."""
    launch = [
        sys.executable, "-m", "loom.trainer.launch", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "loom.trainer.cli", *command,
    ]  # fmt: skip
    child = subprocess.Popen(launch, env=env)
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


def _train_here(config: Config) -> int:
    from loom.dist.loading import CheckpointError  # torch import only where it is needed
    from loom.trainer.train import train

    try:
        train(config)
    except CheckpointError as err:  # loom.dist cannot raise the trainer's errors
        raise ConfigError(f"model.path: {err}") from err
    return 0


def train_command(config_path: Path, nproc: int, overrides: list[str]) -> int:
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    config = _load_config(config_path, overrides)
    if _under_launcher():
        return _train_here(config)
    check_inputs(config)
    config.check_world(_data_parallel_size(config, nproc))
    _check_devices(nproc)
    aside = prepare_output_dir(config)
    code = 1
    try:
        if nproc > 1:
            # The launched ranks must not clear the directory again.
            command = ["train", str(config_path), *overrides, "--train.overwrite", "false"]
            code = _launch(nproc, command)
        else:
            code = _train_here(config)
    finally:
        settle_output_dir(config.train.output_dir, aside, failed=code != 0)
    return code


def convert_command(args: argparse.Namespace) -> int:
    """``loom convert``: here, or on ``--nproc`` ranks started with torchrun."""
    from loom.trainer.tools import convert

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and not _under_launcher():
        convert.refuse_existing(args.dst)  # one error line before any rank starts
        if args.kind == "dcp-to-hf":
            convert.parse_size(args.max_shard_size)
        command = [
            "convert",
            args.kind,
            str(args.checkpoint if args.kind == "dcp-to-hf" else args.src),
            str(args.dst),
        ]
        if args.kind == "dcp-to-hf":
            command += ["--max-shard-size", args.max_shard_size]
            command += ["--model", str(args.model)] if args.model is not None else []
        return _launch(args.nproc, command)
    if args.kind == "dcp-to-hf":
        if _under_launcher():
            import torch.distributed as dist

            dist.init_process_group("gloo")  # the ranks split the shards; no tensor moves
        size = convert.parse_size(args.max_shard_size)
        out = convert.dcp_to_hf(args.checkpoint, args.dst, args.model, size)
    else:
        out = convert.hf_to_dcp(args.src, args.dst)
    if os.environ.get("RANK", "0") == "0":
        print(out)
    return 0


def _tool_command(args: argparse.Namespace) -> int:
    """``plot``, ``convert``, ``truncate``, ``verify``: no config file."""
    if args.command == "convert":
        return convert_command(args)
    if args.command == "plot":
        from loom.trainer.metrics import plot_run

        for path in plot_run(args.run_dir):
            print(path)
        return 0
    if args.command == "truncate":
        from loom.trainer.tools.truncate import truncate

        print(truncate(args.src, args.dst, args.layers, args.vision_layers))
        return 0
    from loom.trainer.tools.verify import verify

    return verify(args.src, args.tolerance_factor, args.batch, args.seq)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.command == "plan":
            from loom.trainer.planner.plan import plan

            print(plan(_load_config(args.config, overrides), args.gpus, args.device), end="")
            return 0
        if args.command != "train":
            if overrides:
                parser.error(f"unrecognized arguments: {' '.join(overrides)}")
            return _tool_command(args)
        if args.print_config:
            config = _load_config(args.config, overrides)
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        return train_command(args.config, args.nproc, overrides)
    except Interrupted as err:
        if os.environ.get("RANK", "0") == "0":
            Console(stderr=True).print(f"stopped: {err}", soft_wrap=True, highlight=False)
        return 143  # what a shell reports for SIGTERM
    except LoomError as err:
        _report(err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
