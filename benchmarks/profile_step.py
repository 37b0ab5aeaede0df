"""Where a Loom training step spends its time: torch.profiler over a few steps.

    python benchmarks/profile_step.py --shape qwen3-1.7b --seq 4096 [--rows 25]

Prints the top CUDA kernels and CPU ops by total time (run with
``LOOM_KERNELS_BACKEND=torch`` to compare against the plain-torch references).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import loom_step_fn, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_model(args.shape, device, loom=True)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device)
    step = loom_step_fn(model, tokens, activation_checkpointing=False)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    print(f"step: {(time.perf_counter() - start) / 3 * 1000:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(table.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
