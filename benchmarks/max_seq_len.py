"""The longest sequence each system trains at batch 1 on one GPU.

    python benchmarks/max_seq_len.py --shape qwen3-1.7b --systems liger,loom --ac \
        [--memory-gib 79.6] [--offload --mlp-tile 16384] [--lengths 393216,524288]

A length "fits" when a full training step (forward, backward, optimizer) runs at it
without a CUDA out-of-memory error, after a warm-up step at 4096 tokens has allocated
the optimizer state (so the step meets the memory of any later step). Each probe is its
own process, so a failed probe leaves nothing behind, and every system gets the same
allocator setting (expandable segments: no fragmentation to blame). Lengths are
multiples of ``--granularity`` tokens; the search bisects up to ``--high``, starting
from the length two short probes predict (``search``, which benchmarks/scaling.py
shares). ``--lengths`` probes just those lengths, shortest first, until one does not
fit: a step at 500k tokens takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

THROUGHPUT = Path(__file__).with_name("train_throughput.py")


ALLOC_CONF = "expandable_segments:True"


class ProbeTimeout(Exception):
    """The probe's step outlasted ``--probe-timeout``: neither fits nor runs out of memory."""


def probe(
    system: str,
    shape: str,
    seq: int,
    ac: bool,
    memory_gib: float | None,
    loom_flags=(),
    alloc_conf: str = ALLOC_CONF,
    timeout: float | None = None,
) -> dict | None:
    """One process training a step at ``seq`` after a short one: its result row, or
    None on OOM. ``loom_flags`` go to train_throughput.py for Loom only."""
    command = [sys.executable, str(THROUGHPUT), "--system", system, "--shape", shape]
    command += ["--seq", str(seq), "--steps", "1", "--warmup", "1", "--warmup-seq", "4096"]
    command += (["--ac"] if ac else []) + (list(loom_flags) if system == "loom" else [])
    command += ["--memory-gib", str(memory_gib)] if memory_gib else []
    env = os.environ | {"PYTORCH_CUDA_ALLOC_CONF": alloc_conf}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeTimeout(f"{system} at {seq} ran past {timeout} s") from None
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        return json.loads(lines[0][len("RESULT ") :])
    if "out of memory" in (done.stderr + done.stdout).lower():
        return None
    raise RuntimeError(f"{system} at {seq} failed for another reason:\n{done.stderr[-2000:]}")


def search(
    probe_fn, low: int, high: int, step: int, memory_gib: float | None, walk: bool = True
) -> tuple[int, list[dict]]:
    """Largest multiple of ``step`` in [low, high] at which ``probe_fn(seq)`` returns a row
    (None: out of memory), 0 when ``low`` does not fit; and the probes.

    A bisection whose first long probe is the length that two short probes predict
    (peak memory taken as linear in the sequence), clamped to the range: long probes are
    slow, and an out-of-memory one costs as much as one that fits. Without ``walk``, a
    predicted length that fits is returned as it is: a lower bound.
    """
    probes = []

    def fits(seq: int) -> bool:
        row = probe_fn(seq)
        probes.append({"seq": seq, "fits": row is not None, **(row or {})})
        print(json.dumps(probes[-1]), flush=True)
        return row is not None

    if not fits(low):
        return 0, probes
    if not fits(2 * low):  # between the two: bisect there, no prediction
        lo, hi = low // step, 2 * low // step - 1
        mid = (lo + hi + 1) // 2
    else:
        lo, hi = 2 * low // step, high // step
        a, b = probes[0]["peak_memory_gib"], probes[1]["peak_memory_gib"]
        capacity = memory_gib or probes[0].get("device_memory_gib")
        # No capacity, or peaks equal at both lengths (a fixed cost dominates): no prediction.
        if capacity and b > a:
            mid = min(max(int(2 * low + (capacity - b) * low / (b - a)) // step, lo + 1), hi)
        else:
            mid = (lo + hi + 1) // 2
    while lo < hi:
        if fits(mid * step):
            lo = mid
            if not walk:
                break
        else:
            hi = mid - 1
        mid = (lo + hi + 1) // 2
    return lo * step, probes


def probe_lengths(probe_fn, lengths) -> tuple[int, list[dict], bool]:
    """The longest of ``lengths`` (probed shortest first, stopping at the first that does
    not fit or times out) that fits, the probes, and whether that is only a lower bound
    (no probe ran out of memory)."""
    best, probes = 0, []
    for seq in sorted(lengths):
        try:
            row = probe_fn(seq)
        except ProbeTimeout:
            probes.append({"seq": seq, "fits": None, "timed_out": True})
            print(json.dumps(probes[-1]), flush=True)
            return best, probes, True
        probes.append({"seq": seq, "fits": row is not None, **(row or {})})
        print(json.dumps(probes[-1]), flush=True)
        if row is None:
            return best, probes, False
        best = seq
    return best, probes, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b")
    parser.add_argument("--systems", default="hf,liger,loom")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--low", type=int, default=16384, help="first probe (then twice it)")
    parser.add_argument("--high", type=int, default=262144, help="longest length probed")
    parser.add_argument("--granularity", type=int, default=16384)
    parser.add_argument(
        "--memory-gib", type=float, help="cap GPU memory (79.6: an H100 80GB on a larger GPU)"
    )
    parser.add_argument(
        "--no-walk", action="store_true", help="stop at a predicted length that fits (a bound)"
    )
    parser.add_argument("--offload", action="store_true", help="loom: inputs in host memory")
    parser.add_argument("--mlp-tile", type=int, default=0, help="loom: tokens per MLP tile")
    parser.add_argument("--lora-rank", type=int, default=0, help="loom: LoRA of this rank")
    parser.add_argument("--qlora", action="store_true", help="loom: the LoRA base in NF4")
    parser.add_argument("--lengths", help="probe these lengths (comma-separated), no search")
    parser.add_argument(
        "--alloc-conf", default=ALLOC_CONF, help="PYTORCH_CUDA_ALLOC_CONF, every system alike"
    )
    parser.add_argument(
        "--probe-timeout", type=float, help="seconds per probe (--lengths: a bound, not a failure)"
    )
    parser.add_argument("--progress", type=Path, help="loom: append each phase's time here")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    loom_flags = (["--offload"] if args.offload else []) + (
        ["--mlp-tile", str(args.mlp_tile)] if args.mlp_tile else []
    )
    loom_flags += ["--progress", str(args.progress)] if args.progress else []
    loom_flags += ["--lora-rank", str(args.lora_rank)] if args.lora_rank else []
    loom_flags += ["--qlora"] if args.qlora else []
    for system in args.systems.split(","):

        def probe_fn(seq, system=system):
            return probe(
                system, args.shape, seq, args.ac, args.memory_gib, loom_flags, args.alloc_conf,
                args.probe_timeout,
            )  # fmt: skip

        if args.lengths:
            seq, probes, bound = probe_lengths(probe_fn, map(int, args.lengths.split(",")))
        else:
            seq, probes = search(
                probe_fn, args.low, args.high, args.granularity, args.memory_gib,
                walk=not args.no_walk,
            )  # fmt: skip
            bound = args.no_walk and seq > 0
        row = {"system": system, "shape": args.shape, "activation_checkpointing": args.ac}
        row |= {"loom_flags": " ".join(loom_flags)} if system == "loom" and loom_flags else {}
        row |= {"memory_gib": args.memory_gib, "max_seq_len": seq, "probes": probes}
        row["lower_bound"] = bound
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
