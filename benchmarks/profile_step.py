"""Where a Loom training step spends its time: torch.profiler over a few steps.

    python benchmarks/profile_step.py --shape qwen3-1.7b --seq 4096 [--accum 4] [--micro 1] [--rows 25]

Prints the step time, how much of it the GPU is busy (the union of kernel and copy
intervals in the trace), the CUDA runtime calls the host makes (launches,
synchronizations), every place that synchronizes the host with the GPU
(``torch.cuda.set_sync_debug_mode``) and the top CUDA kernels and CPU ops by total time.
Run with ``LOOM_KERNELS_BACKEND=torch`` to compare against the plain-torch references.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from _timing import wall_s
from train_throughput import loom_step_fn, random_model

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_summary(trace: dict, steps: int) -> str:
    """GPU busy time (union of its intervals) against the trace's span, and the host's
    CUDA runtime calls, per step."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    busy, end = 0.0, float("-inf")
    for start, stop in gpu:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = gpu[-1][1] - gpu[0][0] if gpu else 0.0
    runtime = collections.Counter()
    runtime_us = collections.Counter()
    for e in events:
        if e.get("cat") == "cuda_runtime":
            runtime[e["name"]] += 1
            runtime_us[e["name"]] += e["dur"]
    lines = [
        f"GPU busy {busy / steps / 1000:.1f} ms of {span / steps / 1000:.1f} ms per step "
        f"({busy / span:.0%})"
        if span
        else "no GPU events",
        "CUDA runtime calls per step (count, host ms):",
    ]
    for name, count in runtime.most_common(12):
        lines.append(f"  {name:40s} {count / steps:8.0f} {runtime_us[name] / steps / 1000:8.2f}")
    return "\n".join(lines)


def sync_sites(step, frames: int = 8) -> collections.Counter:
    """Where one step makes the host wait for the GPU: the stacks of the warnings that
    ``set_sync_debug_mode("warn")`` raises, counted."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        where = " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack[-frames:])
        )
        sites[f"{str(message)[:60]} @ {where}"] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--micro", type=int, default=1, help="rows per forward")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="torch.compile the layers")
    parser.add_argument("--trace", type=Path, help="also write the chrome trace here")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_model(args.shape, device, loom=True)
    tokens = torch.randint(0, model.config.vocab_size, (args.micro, args.seq), device=device)
    step = loom_step_fn(
        model, tokens, activation_checkpointing=False, accum=args.accum, compile=args.compile
    )
    seconds = wall_s(step, calls=3, warmup=3)
    print(
        f"step: {seconds * 1000:.1f} ms, {args.seq * args.micro * args.accum / seconds:,.0f} tokens/s"
    )
    print("host-GPU synchronizations in one step:")
    for site, count in sync_sites(step).most_common():
        print(f"  {count:4d}x {site}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    path = args.trace or Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    print(busy_summary(json.loads(path.read_text()), steps=2))
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(table.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
