"""The longest sequence each system trains at batch 1 on one GPU (binary search).

    python benchmarks/max_seq_len.py --shape qwen3-1.7b --systems hf,liger,loom [--ac]

A length "fits" when two full training steps (forward, backward, optimizer) run
without a CUDA out-of-memory error. Each probe is its own process, so a failed probe
leaves nothing behind. The search runs over multiples of ``--granularity`` tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

THROUGHPUT = Path(__file__).with_name("train_throughput.py")


def fits(system: str, shape: str, seq: int, ac: bool) -> bool:
    command = [sys.executable, str(THROUGHPUT), "--system", system, "--shape", shape]
    command += ["--seq", str(seq), "--steps", "1", "--warmup", "1"] + (["--ac"] if ac else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0 and "RESULT " in done.stdout:
        return True
    if "out of memory" in (done.stderr + done.stdout).lower():
        return False
    raise RuntimeError(f"{system} at {seq} failed for another reason:\n{done.stderr[-2000:]}")


def longest(system: str, shape: str, ac: bool, low: int, high: int, step: int) -> int:
    """Largest multiple of ``step`` in [low, high] that fits (0 when ``low`` does not)."""
    if not fits(system, shape, low, ac):
        return 0
    lo, hi = low // step, high // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(system, shape, mid * step, ac):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b")
    parser.add_argument("--systems", default="hf,liger,loom")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--low", type=int, default=4096)
    parser.add_argument("--high", type=int, default=262144)
    parser.add_argument("--granularity", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for system in args.systems.split(","):
        seq = longest(system, args.shape, args.ac, args.low, args.high, args.granularity)
        row = {"system": system, "shape": args.shape, "activation_checkpointing": args.ac}
        row["max_seq_len"] = seq
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
